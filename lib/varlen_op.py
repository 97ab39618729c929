"""The varlen attention as one custom op (forward and backward), for layers whose recompute is compiled.

torch tags its attention kernels random (`nondeterministic_seeded`: they support dropout). When a
checkpointed region traced by torch.compile recomputes such an op, AOTAutograd replays the RNG state around
it with a higher-order op that inductor's C++ launcher (cpp_wrapper) cannot emit, so
lib/speedups.recompute_in_compiled keeps those outputs instead: ~33 MB a 7B layer at 16 x 1 (+1.04 GiB
over 32 layers, measured on an H100). Dropout is 0 here, so nothing random is recomputed: wrapped in an
untagged op, the attention is recomputed like any other kernel, for a few FLOPs (records of ~200 tokens):
the 7B's 32 layers then trained 1.065x as fast at +0.25 GiB instead of +1.04 (one H100).
torch's own varlen_attn is such an op too, but eager it costs ~0.5 ms of Python a layer and step
(lib/varlen_attention), so only layers compiled with their recompute use this one.
"""
from typing import Optional  # torch.library reads the annotations (older torch: no `int | None`)

import torch

from . import varlen_attention as va


@torch.library.custom_op("cct::varlen_attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float,
              window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """lib.varlen_attention's attention of the flat [tokens, heads, dim] q/k/v (cu: the bounds; keys fewer
    than `window` back): the output and the log-sum-exp (empty off the flash kernel)."""
    if va._flash_ok(q):
        return va._flash(q, k, v, cu, longest, scale, window)
    out = va._masked(q, k, v, cu, scale, window)
    return out.contiguous(), q.new_empty(0, dtype=torch.float32)  # the layout the fake promises


@attention.register_fake
def _(q, k, v, cu, longest, scale, window):
    lse = q.new_empty((q.shape[1], q.shape[0]) if va._flash_ok(q) else (0,), dtype=torch.float32)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse


@torch.library.custom_op("cct::varlen_attention_backward", mutates_args=())
def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu: torch.Tensor, longest: int, scale: float,
             window: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v: the flash kernel's backward, or the masked attention's by formula."""
    if va._flash_ok(q):
        cu, left = va.kernel_bounds(q, cu, window)
        rng, unused = torch.zeros(2, dtype=torch.uint64, device=q.device), q.new_empty(0)  # no dropout: no state
        return torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, longest, longest, 0.0, left == -1, rng, unused,
            scale=scale, window_size_left=left, window_size_right=0)
    return _masked_backward(dout, q, k, v, cu, scale, window)


def _masked_backward(dout, q, k, v, cu, scale, window):
    """The masked attention's gradients by their formulas (an op's kernel runs below autograd, so it cannot
    differentiate va._masked): P = softmax(scale q k^T | mask), dV = P^T dO, dS = P (dP - rowsum(dP P))."""
    group = q.shape[1] // k.shape[1]  # query heads sharing a key/value head (GQA)
    dt = torch.promote_types(q.dtype, torch.float32)  # half precision computes in fp32
    qh, kh, vh, dh = (x.transpose(0, 1).to(dt) for x in (q, k.repeat_interleave(group, 1),
                                                        v.repeat_interleave(group, 1), dout))
    seen = va.mask(cu, q.shape[0], q.device, window)
    p = (scale * qh @ kh.transpose(1, 2)).masked_fill(~seen, float("-inf")).softmax(-1)
    dp = dh @ vh.transpose(1, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq, dk, dv = scale * ds @ kh, scale * ds.transpose(1, 2) @ qh, p.transpose(1, 2) @ dh
    fold = lambda g, like: g.unflatten(0, (-1, group)).sum(1).transpose(0, 1).to(like.dtype).contiguous()  # noqa: E731
    return dq.transpose(0, 1).to(q.dtype).contiguous(), fold(dk, k), fold(dv, v)


@backward.register_fake
def _(dout, q, k, v, out, lse, cu, longest, scale, window):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup(ctx, inputs, output):
    q, k, v, cu, ctx.longest, ctx.scale, ctx.window = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = backward(dout, q, k, v, out, lse, cu, ctx.longest, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup)


def use_in(layer) -> None:
    """The layer's attention module attends through this op when its attention is varlen (training)."""
    for m in layer.modules():
        if type(m).__name__.endswith("Attention"):  # transformers' names: LlamaAttention, Qwen2Attention...
            setattr(m, va.ONE_OP, True)
