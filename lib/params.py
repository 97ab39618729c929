"""One typed parameter dataclass per notebook, built from groups (model and data, LoRA, optimiser,
speed, curve, generation) so the recipe reads in parts; lib.paramfile loads them from YAML.

papermill only warns about unknown parameters, so a typo would silently do nothing; here unknown keys
and wrong types are errors that name the key, both in the runner and inside the notebook itself.
"""
import dataclasses
from dataclasses import dataclass, field
from .launch import per_process_accum
from .paramcheck import (ParamsError, check_types, choice as _choice, fraction as _fraction,
                         non_negative as _non_negative, positive as _positive, template as _template)

__all__ = ["ParamsError"]


def method(quantization: str, full_finetune: bool = False, reverse_pairs: bool = False) -> str:
    """What a recipe is called: LoRA on a 4-bit NF4 base is QLoRA, on a 16-bit base plain LoRA; every
    weight trained is full fine-tuning; trained on each pair both ways round, it says so."""
    name = "full fine-tuning" if full_finetune else "QLoRA" if quantization == "nf4" else "LoRA"
    return f"{name}, pairs both ways" if reverse_pairs else name


def kept(full_finetune: bool, step: int, num_beams: int = 1, mbr_candidates: int = 1, soup_seeds: int = 1) -> str:
    """What 01 keeps and how its answers are decoded: 'best adapter (step 500)', 'best model (step 625),
    4 beams', '..., 8 beams, MBR of 8', 'soup of 2 seeds' best models (step 1250)' (full fine-tuning keeps
    the whole model; chrF depends on the decoding)."""
    what = f"soup of {soup_seeds} seeds' best models" if soup_seeds > 1 else "best model" if full_finetune else "best adapter"
    return (f"{what} (step {step})" + (f", {num_beams} beams" if num_beams > 1 else "")
            + (f", MBR of {mbr_candidates}" if mbr_candidates > 1 else ""))


@dataclass
class Common:
    """Parameters every notebook shares."""

    run: str = "default"  # names the run: reports/<run>/<timestamp>/
    out_dir: str = "reports/interactive"  # where results go; the runner sets it per run
    model: str = "gemma-3-270m"  # embedded name (lib.embedded.EMBEDDED), hub id or local folder
    data_dir: str = "data/sample"  # folder with train/public_test/private_test.json
    eval_split: str = "public_test"
    eval_limit: int = 0  # score only the first N records (0 = all)
    template: str = "course"  # prompt template name (lib.prompts.TEMPLATES)
    quantization: str = "nf4"  # nf4 (QLoRA: 4-bit NF4, double quant) or none
    compute_dtype: str = "float32"  # the seed's; bfloat16 is ~3x faster on GPUs
    device: str = "auto"  # auto, cpu, cuda
    max_length: int = 2048  # the course's cut
    eval_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        self.check()

    def check(self):
        from . import models

        _choice("quantization", self.quantization, models.QUANTIZATIONS)
        _choice("compute_dtype", self.compute_dtype, models.DTYPES)
        _choice("eval_split", self.eval_split, ("train", "public_test"))
        _template(self.template)
        _positive(self, "max_length", "eval_batch_size")
        if self.eval_limit < 0:
            raise ParamsError("parameter 'eval_limit' must be >= 0 (0 = all)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoraParams:
    """The adapter (the seed's: r=64, alpha=16, no dropout, the 7 projections)."""

    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    use_dora: bool = False  # DoRA (peft): LoRA on the direction of each weight plus a trained magnitude per row
    full_finetune: bool = False  # train every weight (fp32 master copy, 16 bytes a weight with AdamW), no adapter

    def check(self):
        _positive(self, "lora_r", "lora_alpha")
        _fraction("lora_dropout", self.lora_dropout)
        if self.full_finetune and (getattr(self, "quantization", "none") != "none" or self.use_dora):
            raise ParamsError("full_finetune trains the 16-bit weights themselves: it needs quantization: none "
                              "and no use_dora")
        for flag in ("cache_dequantized", "lean_nf4"):  # they replace the 4-bit layers DoRA reads its norms from
            if self.use_dora and getattr(self, flag, False):
                raise ParamsError(f"use_dora and {flag} exclude each other (DoRA needs peft's own 4-bit layers)")


@dataclass
class OptimParams:
    """Data, batch and optimiser (the seed's: 1 x 16, 5 epochs, lr 2e-4 after 3% warm-up, clip 0.3)."""

    train_limit: int = 0  # train on the first N records (0 = all)
    # also train each pair the other way round (lib/reverse.py): its answer as a request of the other
    # direction; twice the records, so twice the steps an epoch
    reverse_pairs: bool = False
    micro_batch_size: int = 1
    grad_accum: int = 16  # effective batch = micro_batch_size * grad_accum
    epochs: float = 5.0
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    learning_rate: float = 2e-4
    # The seed set "constant" + warmup_ratio 0.03, but HF's "constant" ignores warmup; this applies it.
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optim: str = "adamw_torch"  # adamw_torch_fused: the same AdamW in one kernel per step
    gradient_checkpointing: bool = True
    neftune_noise_alpha: float = 0.0  # > 0: NEFTune's uniform noise on the input embeddings in training (5 is usual)
    # > 1: train this many runs (seeds seed, seed + 1, ...; each resumable and read back like any run) and keep
    # the average of their best models' weights, a model soup (lib/soup.py); full fine-tuning only
    soup_seeds: int = 1

    def check(self):
        _positive(self, "micro_batch_size", "grad_accum", "learning_rate", "soup_seeds")
        if self.soup_seeds > 1 and not getattr(self, "full_finetune", False):
            raise ParamsError("soup_seeds > 1 averages whole models: it needs full_finetune: true (two LoRA "
                              "adapters' A and B matrices do not average into the average of their updates)")
        _non_negative(self, "train_limit", "max_steps", "max_grad_norm", "weight_decay", "neftune_noise_alpha")
        _choice("lr_scheduler", self.lr_scheduler, ("constant", "constant_with_warmup", "linear", "cosine"))
        _choice("optim", self.optim, ("adamw_torch", "adamw_torch_fused"))
        _fraction("warmup_ratio", self.warmup_ratio)
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ParamsError("set epochs > 0 or max_steps > 0")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # torch.compile's modes that train here
# settings that mean something only with compile: true (an error without it)
COMPILE_ONLY = ("compile_mode", "cpp_wrapper", "compiled_recompute", "cuda_graphs")
# torch.compile's CUDA-graph modes, measured on an H100 (benchmarks/README.md) with the layers compiled one by
# one: under gradient checkpointing the recomputed forward overwrote outputs the backward still needed; without
# it, every layer after the first ran eagerly ("pending, uninvoked backwards") and the process crashed
# (segmentation fault, qwen2.5-coder-1.5b, torch 2.11); cuda_graphs compiles the whole decoder instead, one graph
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class SpeedParams:
    """Settings that change speed and memory, not the loss (lib/speedups.py, benchmarks/README.md)."""

    answer_loss: bool = True  # LM head only on answer tokens: same loss, no prompt logits (big vocabularies)
    head_loss: str = "chunked"  # the answer loss's LM head: chunked (lib/chunked_loss.py) or cce (cut-cross-entropy, CUDA)
    packing: bool = False  # sequences laid end to end in rows, no padding between them (same per-example loss)
    pack_tokens: int = 512  # row length for packing (a longer sequence gets a row of its own)
    # packed sequences attend by their boundaries, not through a block-diagonal mask (lib/varlen_attention.py):
    # on CUDA in bf16 torch's flash varlen kernel computes only each sequence's causal pairs, and a micro-batch
    # is one row (no row padding; pack_tokens unused). Same attention; evaluation and generation keep SDPA
    varlen_attention: bool = False
    group_by_length: bool = False  # batches of similar length pad less (speed); False keeps the seed's order
    # each optimizer step's records split into micro-batches of near-equal tokens (lib/sampler.py, its own
    # shuffle by `seed`): under DDP no rank waits for a longer batch; the same records per step on 1 or N
    # GPUs, so the same curve
    balance_ranks: bool = False
    keep_frozen_dtype: bool = False  # don't upcast frozen embeddings/norms/LM head to fp32 (peft's kbit prep does)
    cache_dequantized: bool = False  # dequantize the 4-bit weights once: same numbers, +2 bytes/weight
    # with gradient_checkpointing: recompute only the first N decoder layers in backward (0 = all). Each layer
    # left out keeps its activations (memory) and skips its recomputed forward (a third of its FLOPs)
    checkpointed_layers: int = 0
    compile: bool = False  # torch.compile each decoder layer
    compile_mode: str = "default"  # torch.compile's mode for the layers (max-autotune-no-cudagraphs: tuned matmuls)
    # the compiled layers launch their kernels from generated C++ instead of Python: less host time a kernel
    # for steps bound by the host (qwen2.5-coder-1.5b on an H100: 1.45x; the 7B: 1.00x, 1.09x with
    # varlen_attention). Its compile builds C++ (on a CPU several times longer; on the H100 no longer)
    cpp_wrapper: bool = False
    # with compile and gradient_checkpointing: the first N checkpointed decoder layers have their recompute
    # traced into their compiled backward (one graph a layer, launched once) instead of HF's checkpoint calling
    # the compiled forward again from Python (lib/speedups.recompute_in_compiled); 0 = none. Under SDPA each
    # such layer keeps its attention's output (its kernels are tagged random: see there), ~33 MB a 7B layer
    # at 16 x 1: all 32 of the 7B's trained 1.07-1.09x as fast at +1.04 GiB on an H100; with varlen_attention
    # the attention is an untagged op (lib/varlen_op), recomputed, no memory added (benchmarks/README.md)
    compiled_recompute: int = 0
    # the whole decoder compiled as one graph and replayed as CUDA graphs (torch.compile's reduce-overhead):
    # the host launches a recorded graph a micro-batch instead of its ~3,300 kernels one by one, so a step the
    # host bounds (the 1.5B's LoRA) runs at the GPU's pace. A micro-batch's row is padded to a multiple of
    # GRAPH_MULTIPLE tokens (one graph recorded for each width met). Needs varlen_attention (no mask, no
    # host-GPU sync in the forward) and no gradient checkpointing; replaces compiling the layers one by one.
    # study-lora's 1.5B at 16 x 1 on an H100: 2.80x (0.148 -> 0.053 s a step); the whole decoder compiles in
    # ~3 minutes cold, ~70 s more than layer by layer (benchmarks/README.md). Under DDP the Trainer sums the
    # gradients itself, one flat all-reduce after the step's backward (lib/graph_grads.py)
    cuda_graphs: bool = False
    # with cuda_graphs: the trained weights become views of one flat parameter per dtype, stepped by the optimizer
    # as one tensor (lib/graph_grads.py): AdamW's per-weight host work off a host-bound step; the same update.
    # Tested on CPU and on an H100; not timed against flat_params: false on one machine (benchmarks/README.md)
    flat_params: bool = False
    lean_nf4: bool = False  # 4-bit layers without bitsandbytes' Python wrappers (lib/nf4.py): same products
    # the LoRA projections that read the same input (q/k/v, gate/up) computed as one group in training: one base
    # matmul and one x @ A a group, fewer launches and thin matmuls (lib/fused_projections.py); same sums
    fuse_projections: bool = False
    num_processes: int = 1  # data-parallel processes (GPUs) via accelerate launch; grad_accum is split across them
    # DDP all-reduces the gradients in bf16 (half the bytes; the average rounded to bf16). Over NVLink it made no
    # difference (2 x H100, README): for hosts whose GPUs talk over PCIe or a network
    ddp_bf16_grads: bool = False
    # DDP without three of its per-step extras: each gradient is a view of its all-reduce bucket (no copy into
    # and out of the buckets: 392 LoRA tensors on qwen2.5-1.5B), no broadcast of the buffers (rotary
    # frequencies, the same on every rank) before each forward, and each compiled layer left one graph
    # (dynamo's DDPOptimizer cut each of the 1.5B's in two). The same sums. On 2 x H100 it took 01's
    # host-bound 1.5B step from 1.38x to 1.96x one GPU (benchmarks/README.md); false: DDP as torch sets it up
    ddp_lean: bool = True

    def check(self):
        _positive(self, "pack_tokens", "num_processes")
        _non_negative(self, "checkpointed_layers", "compiled_recompute")
        if self.checkpointed_layers and not self.gradient_checkpointing:
            raise ParamsError("checkpointed_layers needs gradient_checkpointing: true (it chooses which layers recompute)")
        from .chunked_loss import HEAD_LOSSES

        _choice("head_loss", self.head_loss, tuple(HEAD_LOSSES))
        if self.head_loss == "cce":
            _needs_cce()
        if self.compile_mode in CUDA_GRAPH_MODES:
            raise ParamsError(f"compile_mode: {self.compile_mode} (CUDA graphs) does not train with the layers "
                              "compiled one by one: measured on an H100, it overwrote outputs the backward needed "
                              "under gradient_checkpointing and crashed without it; use default or "
                              "max-autotune-no-cudagraphs, or cuda_graphs: true (the whole decoder as one graph)")
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        if self.compiled_recompute and not self.gradient_checkpointing:
            raise ParamsError(f"compiled_recompute: {self.compiled_recompute} needs gradient_checkpointing: true (it "
                              "moves the recompute into the compiled code); without checkpointing set "
                              "compiled_recompute: 0")
        for flag in COMPILE_ONLY:
            if getattr(self, flag) != getattr(SpeedParams, flag) and not self.compile:
                raise ParamsError(f"{flag}: {getattr(self, flag)} needs compile: true")
        if self.compile:
            import torch

            if not hasattr(torch.compiler, "set_stance"):
                raise ParamsError("compile: true needs torch >= 2.6 (torch.compiler.set_stance)")
        for flag in ("cache_dequantized", "lean_nf4"):
            if getattr(self, flag) and self.quantization != "nf4":
                raise ParamsError(f"{flag} needs quantization: nf4 (there are no 4-bit layers)")
        if self.varlen_attention and not self.packing:
            raise ParamsError("varlen_attention needs packing: true (it attends by the packed sequences' bounds)")
        if self.varlen_attention and self.pack_tokens != SpeedParams.pack_tokens:
            raise ParamsError("pack_tokens is the row length under a mask; with varlen_attention a micro-batch is "
                              "one row: leave pack_tokens out")
        if self.cuda_graphs:
            _graphable(self)
        if self.flat_params and not self.cuda_graphs:
            raise ParamsError("flat_params needs cuda_graphs: true (the flat gradient buffers it steps are cuda_graphs')")
        if self.balance_ranks and self.group_by_length:
            raise ParamsError("balance_ranks and group_by_length exclude each other (both choose the batches)")
        if self.fuse_projections:
            _fusable(self)
        if self.cache_dequantized and self.lean_nf4:
            raise ParamsError("cache_dequantized and lean_nf4 exclude each other (the cache replaces the 4-bit layers)")
        try:
            per_process_accum(self.grad_accum, self.num_processes)
        except ValueError as e:
            raise ParamsError(str(e)) from None


def _graphable(p):
    """cuda_graphs' conditions: a forward without host-GPU syncs or masks, one graph from input to output."""
    if not p.varlen_attention:
        raise ParamsError("cuda_graphs needs varlen_attention: true (transformers' packed mask syncs host and GPU "
                          "inside the forward, which a CUDA graph cannot hold)")
    if p.gradient_checkpointing:
        raise ParamsError("cuda_graphs needs gradient_checkpointing: false (the recomputed forward would replay "
                          "a graph whose outputs the backward still reads)")
    if p.compile_mode != SpeedParams.compile_mode or p.cpp_wrapper:
        raise ParamsError("cuda_graphs compiles the decoder in torch's reduce-overhead mode: leave compile_mode "
                          "and cpp_wrapper out")
    if p.ddp_bf16_grads:
        raise ParamsError("cuda_graphs all-reduces the gradients itself, in one flat fp32 buffer after the backward "
                          "(lib/graph_grads.py): ddp_bf16_grads, a hook of DDP's, would not run; leave it out")


def _fusable(p):
    """fuse_projections' conditions that the recipe alone decides (the model's layers are checked at build)."""
    if getattr(p, "full_finetune", False) or getattr(p, "use_dora", False):
        raise ParamsError("fuse_projections groups LoRA projections: not with full_finetune or use_dora")
    if getattr(p, "lora_dropout", 0.0):
        raise ParamsError("fuse_projections needs lora_dropout: 0 (peft draws a dropout mask per projection; a "
                          "group reads its input once)")
    if p.quantization == "nf4" and not (p.lean_nf4 or p.cache_dequantized):
        raise ParamsError("fuse_projections with quantization: nf4 needs lean_nf4 or cache_dequantized (it reads "
                          "their 4-bit or dequantized weights, not bitsandbytes' layers)")


def _needs_cce():
    import importlib.util

    import torch

    if importlib.util.find_spec("cut_cross_entropy") is None or not torch.cuda.is_available():
        raise ParamsError("head_loss: cce needs a CUDA GPU and the cut-cross-entropy package "
                          "(its kernels are Triton's); head_loss: chunked runs anywhere")


@dataclass
class CurveParams:
    """Learning curve, checkpoints and logging."""

    eval_steps: int = 100  # public-test perplexity every N optimizer steps (the learning curve)
    save_steps: int = 100  # a resumable checkpoint every N steps and at the end; 0 = none (a cut run starts over)
    logging_steps: int = 10
    resume: bool = True  # continue from the last checkpoint in out_dir if there is one

    def check(self):
        _positive(self, "eval_steps", "logging_steps")
        _non_negative(self, "save_steps")


# The groups of a fine-tuning recipe, in the order a reader meets them (the report's hyperparameter table)
TRAIN_GROUPS = {"LoRA": LoraParams, "optimiser": OptimParams, "speed": SpeedParams, "curve": CurveParams}


@dataclass
class TrainParams(CurveParams, SpeedParams, OptimParams, LoraParams, Common):
    """QLoRA recipe shared by 01 and 04 (the `train` section of a params file); defaults are the seed's."""

    def check(self):
        Common.check(self)
        for group in TRAIN_GROUPS.values():
            group.check(self)


@dataclass
class GenerateParams:
    """Decoding settings (the seed's zero-shot settings; greedy by default)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only: > 1 favours longer answers (chrF weighs recall twice)
    gen_batch_size: int = 16
    mbr_candidates: int = 1  # > 1: generate this many (beams or samples), keep the one agreeing most with the rest (lib.mbr)
    first_line_only: bool = True  # answers are one line; a model given examples goes on with the next one
    quality_limit: int = 0  # chrF/BLEU of answers generated for the first N eval records (0 = all)

    def check(self):
        _positive(self, "max_new_tokens", "num_beams", "gen_batch_size", "temperature", "top_p")
        _non_negative(self, "top_k", "quality_limit")
        if self.length_penalty != 1.0 and self.num_beams == 1:
            raise ParamsError("length_penalty applies to beam search only: set num_beams > 1")
        _positive(self, "mbr_candidates")
        if self.mbr_candidates > self.num_beams and not self.do_sample:
            raise ParamsError(f"mbr_candidates = {self.mbr_candidates} needs as many beams (num_beams >= "
                              f"{self.mbr_candidates}) or sampling (do_sample: true)")


@dataclass
class FinetuneParams(GenerateParams, TrainParams):
    """notebooks/01_finetune."""

    predict_split: str = "private_test"
    predict_limit: int = 0  # predict the first N records (0 = all)
    show_examples: int = 5

    def check(self):
        TrainParams.check(self)
        GenerateParams.check(self)
        _choice("predict_split", self.predict_split, ("public_test", "private_test"))
        _non_negative(self, "predict_limit", "show_examples")


@dataclass
class ZeroshotParams(Common):
    """notebooks/02_zeroshot."""

    templates: list[str] = field(default_factory=lambda: ["course", "instructive", "chat"])

    def check(self):
        super().check()
        for t in self.templates:
            if t != "chat":  # the model's own chat template (lib.prompts.chat)
                _template(t)


@dataclass
class FewshotParams(GenerateParams, Common):
    """notebooks/03_fewshot_sweep."""

    shots: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    strategies: list[str] = field(default_factory=lambda: ["fixed", "random", "retrieved"])
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    show_examples: int = 5

    def check(self):
        Common.check(self)
        GenerateParams.check(self)
        for s in self.strategies:
            _choice("strategies", s, ("fixed", "random", "retrieved"))
        if any(k < 0 for k in self.shots):
            raise ParamsError("shots must be >= 0")
        _non_negative(self, "show_examples")
        if not self.random_seeds:
            raise ParamsError("random_seeds must name at least one seed")


@dataclass
class PlmParams(TrainParams):
    """notebooks/04_plm_compare: the same recipe on several base models."""

    models: list[str] = field(default_factory=lambda: ["gemma-3-270m", "smollm2-135m"])

    def check(self):
        TrainParams.check(self)
        if not self.models or len(set(self.models)) < len(self.models):
            raise ParamsError(f"models must list distinct models, got {self.models}")


@dataclass
class ReportParams(Common):
    """notebooks/05_report: reads only the results under out_dir."""

    title: str = "Classical Chinese <-> vernacular instruction tuning"


NOTEBOOKS = {
    "01_finetune": FinetuneParams,
    "02_zeroshot": ZeroshotParams,
    "03_fewshot_sweep": FewshotParams,
    "04_plm_compare": PlmParams,
    "05_report": ReportParams,
}

