"""Opt-in training speedups for QLoRA that leave the numbers alone (each measured in benchmarks/).

- keep_frozen_dtype: peft's kbit preparation casts every frozen non-4-bit weight (embeddings, norms,
  LM head) to fp32; with bf16 compute that doubles their memory and makes the residual stream fp32.
- cache_dequantized: bitsandbytes dequantizes each 4-bit weight to the compute dtype on every call
  (forward, recompute and backward) and multiplies with that. Doing it once and keeping the result
  gives the very same products without the dequantize kernels; it costs 2 bytes per weight, so it
  suits small models (gemma-3-270m: +0.2 GB), not 7B ones under a memory cap.
- compile_layers: torch.compile of each decoder layer (regional compilation): the small model's step
  is bound by kernel launches and Python, not FLOPs.
- checkpoint_only: gradient checkpointing on some layers, not all: memory traded for recomputation.
- recompute_in_compiled: a checkpointed layer's recompute moved into its compiled backward.
- compile_decoder: the whole decoder as one graph replayed as CUDA graphs: the host launches one graph.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import varlen_op


class DequantizedLinear(nn.Linear):
    """A frozen Linear holding a 4-bit layer's dequantized weight; computes as bitsandbytes does
    (input cast to the weight's dtype, output cast back)."""

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def _dequantized(layer) -> DequantizedLinear:
    from bitsandbytes.functional import dequantize_4bit

    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype or torch.float32)
    out = DequantizedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            device="meta", dtype=w.dtype)
    out.weight = nn.Parameter(w.reshape(layer.out_features, layer.in_features), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.data.to(w.dtype), requires_grad=False)
    return out


def cache_dequantized(model) -> int:
    """Replace every bitsandbytes 4-bit Linear in model (also inside LoRA wrappers) by its
    DequantizedLinear; returns how many were replaced."""
    from .nf4 import swap_4bit

    n = swap_4bit(model, _dequantized)
    if n and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the packed 4-bit storage is gone
    return n


def prepare_frozen(model, gradient_checkpointing: bool):
    """peft's prepare_model_for_kbit_training without its fp32 upcast of the frozen weights."""
    for prm in model.parameters():
        prm.requires_grad_(False)
    if gradient_checkpointing:
        # the embeddings are frozen, so their output must ask for grad or checkpointed layers get none
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def decoder_layers(model):
    return _decoder(model).layers


def checkpoint_only(model, n: int) -> None:
    """Gradient checkpointing on the first n decoder layers only (HF turns it on for all): the others keep
    their activations for backward instead of running their forward again."""
    layers = decoder_layers(model)
    if n > len(layers):
        raise ValueError(f"checkpointed_layers: {n} is more than the model's {len(layers)} decoder layers")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n


def eager():
    """Run compiled layers eagerly inside this context: the learning-curve evaluations and generation
    see other shapes (padding masks, one-token decoding) whose compilation would cost more than it saves."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; older ones: compile is off anyway
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def uncompile(model):
    """Undo compile_layers or compile_decoder (after training: predictions and later use run eagerly)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    _decoder(model)._compiled_call_impl = None


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def _save_random_ops(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep the outputs of ops torch tags as random, recompute the rest.
    The attention kernels (flash, memory-efficient, CPU flash) carry the tag because they support dropout;
    recomputed, AOTAutograd would wrap each in a replay of the RNG state, a higher-order op that
    inductor's C++ launcher (cpp_wrapper) cannot emit (measured: the 7B failed to compile on an H100).
    Kept, they cost memory (+1.04 GiB on the 7B at 16 x 1): varlen attention goes through lib.varlen_op's
    untagged op instead, which is recomputed; SDPA's masked attention is still kept."""
    from torch.utils.checkpoint import CheckpointPolicy

    random = torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())
    return CheckpointPolicy.MUST_SAVE if random else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_in_compiled(layer) -> None:
    """Checkpoint the layer inside the code torch.compile traces, not around it. HF checkpoints a layer
    from outside (reentrant CheckpointFunction): its backward runs Python, calls the compiled forward a
    second time, then that graph's backward. Traced inside (non-reentrant checkpoint), the compiled
    forward saves only the layer's inputs (and, unless varlen, its attention's output: _save_random_ops), and AOTAutograd
    puts the recomputation into the compiled backward: one graph, launched once (torchtitan compiles its
    checkpointed blocks so). Eval and no-grad calls run the plain forward."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    forward = layer.forward
    keep_random = functools.partial(create_selective_checkpoint_contexts, _save_random_ops)

    def checkpointed(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=keep_random, **kwargs)

    layer.forward = checkpointed
    layer.gradient_checkpointing = False  # HF's own wrapper off: it would checkpoint the layer twice
    varlen_op.use_in(layer)  # its varlen attention untagged, so recomputed rather than kept


def compile_layers(model, mode: str = "default", cpp_wrapper: bool = False, compiled_recompute: int = 0) -> int:
    """torch.compile each decoder layer in place (their shared code compiles once per shape family).
    cpp_wrapper: inductor writes each compiled graph's launcher in C++, not Python, so launching its
    kernels costs the host less; torch.compile takes either a mode or options, so the mode's own options
    go along. compiled_recompute: the first N checkpointed layers recompute inside their compiled code."""
    import torch._inductor

    kw = {"mode": mode}
    if cpp_wrapper:
        kw = {"options": {**torch._inductor.list_mode_options(mode), "cpp_wrapper": True}}
    layers = decoder_layers(model)
    checkpointed = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
    if compiled_recompute > len(checkpointed):
        raise ValueError(f"compiled_recompute: {compiled_recompute} is more than the model's {len(checkpointed)} "
                         "checkpointed decoder layers")
    for layer in checkpointed[:compiled_recompute]:
        recompute_in_compiled(layer)
    for layer in layers:
        layer.compile(dynamic=True, **kw)
    return len(layers)


def compile_decoder(model) -> None:
    """torch.compile the whole decoder (embeddings to final norm) as one graph replayed as CUDA graphs
    (cuda_graphs): one launch a micro-batch and shape, where compile_layers' host launches each kernel.

    The layers compiled one by one cannot do this: they share one compiled function, whose CUDA graph is
    replayed again before the backward of its first call has run (measured: torch ran every later layer
    eagerly, then crashed). Floats (RMSNorm's eps, LoRA's scale) stay constants in the graph: under
    dynamic shapes torch makes them 0-d CPU inputs, which split the graph around the CPU. Process-wide.
    """
    import torch._dynamo

    torch._dynamo.config.specialize_float = True
    _decoder(model).compile(mode="reduce-overhead", dynamic=True)
