"""Frozen NF4 linear layers without bitsandbytes' Python layers (TrainParams.lean_nf4).

A 7B QLoRA step is bound by the host, not the GPU (benchmarks/README.md: ~0.4 s of GPU work in a
~1 s step). py-spy showed ~23% of the host's time in bitsandbytes' Python around each 4-bit matmul:
`Params4bit.__torch_function__` on every op that touches the weight, `matmul_4bit`'s checks, the
`gemm_4bit` op's dispatch to its dequantize-then-linear fallback. NF4Linear keeps the same packed
storage and computes the same thing with fewer steps:

- eager: bitsandbytes' own `gemm_4bit` op, called as `matmul_4bit` calls it (a fused kernel for few
  rows, dequantize + F.linear for many), so results are bitsandbytes' to the bit;
- under torch.compile: the dequantization written in torch ops (a table lookup and a multiply), which
  inductor fuses into one kernel with no Python in between, then F.linear: bitsandbytes' own path
  for more than 1,536 rows (to the bit), bf16 rounding away from its fused kernel for fewer.

Backward dequantizes again instead of keeping the 16-bit weight, as bitsandbytes does (memory).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

NESTED_BLOCK = 256  # bitsandbytes' block size for the double-quantized absmax (the only one it supports)


def _absmax(absmax, absmax2, code2, offset):
    """fp32 absmax per 64-weight block (double quantization undone). bitsandbytes' own kernel even under
    torch.compile: fused, code2[q] * absmax2 + offset would become one fma, a rounding fewer than
    bitsandbytes (which stores the product, then adds), and the weights would differ in the last bit."""
    if absmax2 is None:
        return absmax
    return torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, NESTED_BLOCK, torch.float32) + offset


def dequantize(packed, absmax, absmax2, code2, offset, code, blocksize: int, shape, dtype, fuse=None):
    """The weight [out, in] in dtype, as bitsandbytes' dequantize_4bit computes it (high nibble first,
    table value times its block's absmax in fp32, rounded once to dtype). fuse (default: when torch.compile
    traces this) writes the lookup in torch ops, which inductor turns into one kernel."""
    scale = _absmax(absmax, absmax2, code2, offset)
    if torch.compiler.is_compiling() if fuse is None else fuse:
        nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).view(-1, blocksize)
        return (code[nibbles.long()] * scale[:, None]).to(dtype).view(shape)
    return torch.ops.bitsandbytes.dequantize_4bit(packed, scale, blocksize, "nf4", list(shape), dtype)


@functools.cache
def _has_gemm_op() -> bool:
    """bitsandbytes >= 0.50: gemm_4bit takes the double-quantized absmax itself."""
    return "absmax_8bit" in str(torch.ops.bitsandbytes.gemm_4bit.default._schema)


def _bnb_linear(x, bias, packed, absmax, absmax2, code2, offset, blocksize, shape):
    """bitsandbytes' 4-bit linear op with the arguments its matmul_4bit passes."""
    if absmax2 is None:
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed.view(-1, 1), list(shape), absmax, blocksize, "nf4",
                                                        bias=bias)
    return torch.ops.bitsandbytes.gemm_4bit.default(x, packed.view(-1, 1), list(shape), absmax2, blocksize, "nf4",
                                                    bias=bias, absmax_8bit=absmax, absmax_code=code2,
                                                    absmax_offset=offset)


class _Matmul(torch.autograd.Function):
    """x @ W.t() + bias; W is dequantized again in backward, never saved (as bitsandbytes does)."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, absmax2, code2, offset, code, blocksize, shape):
        ctx.save_for_backward(packed, absmax, absmax2, code2, offset, code)
        ctx.blocksize, ctx.shape = blocksize, shape
        if not torch.compiler.is_compiling() and _has_gemm_op():
            return _bnb_linear(x, bias, packed, absmax, absmax2, code2, offset, blocksize, shape)
        w = dequantize(packed, absmax, absmax2, code2, offset, code, blocksize, shape, x.dtype)
        return F.linear(x, w, bias)  # the (frozen) bias inside the same linear, as bitsandbytes

    @staticmethod
    def backward(ctx, grad):
        # bitsandbytes' kernel, not the fused lookup: compiled, the two identical lookups of forward and
        # backward would be merged into one whose 16-bit result is kept for backward (+1.2 GiB at 7B)
        w = dequantize(*ctx.saved_tensors, ctx.blocksize, ctx.shape, grad.dtype, fuse=False)
        return (grad @ w,) + (None,) * 9


class NF4Linear(nn.Module):
    """A bitsandbytes Linear4bit (NF4, absmax double-quantized or not) on the same storage."""

    def __init__(self, layer):
        super().__init__()
        qs = layer.weight.quant_state
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = layer.compute_dtype or torch.float32
        self.blocksize, self.shape = qs.blocksize, tuple(qs.shape)
        nested = qs.nested
        # the same memory as plain tensors: no Params4bit, so no __torch_function__ on every op. The packed
        # weight stays a frozen parameter (parameter counts as before; DDP syncs it once, at wrap time);
        # the quantization state stays unregistered, as bitsandbytes keeps it: DDP would broadcast
        # buffers on every forward
        self.packed = nn.Parameter(torch.Tensor._make_subclass(torch.Tensor, layer.weight.data.view(-1)),
                                   requires_grad=False)
        self.code, self.absmax = qs.code, qs.absmax
        self.absmax2, self.code2, self.offset = (qs.state2.absmax, qs.state2.code, qs.offset) if nested else (None,) * 3
        self.bias = layer.bias

    def weight_dequantized(self, dtype=None):
        return dequantize(self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.code,
                          self.blocksize, self.shape, dtype or self.compute_dtype)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _Matmul.apply(x.to(self.compute_dtype), bias, self.packed, self.absmax, self.absmax2, self.code2,
                             self.offset, self.code, self.blocksize, self.shape).to(x.dtype)


def supported(layer) -> bool:
    """NF4 in uint8 storage, whole blocks, a frozen bias (its gradient is not computed)."""
    qs = getattr(layer.weight, "quant_state", None)
    return (qs is not None and qs.quant_type == "nf4" and layer.weight.dtype == torch.uint8
            and (layer.bias is None or not layer.bias.requires_grad)
            and layer.weight.numel() * 2 % qs.blocksize == 0
            and (not qs.nested or qs.state2.blocksize == NESTED_BLOCK))


def swap_4bit(model, make, accept=lambda layer: True) -> int:
    """Replace every bitsandbytes Linear4bit in model (also inside LoRA wrappers) that accept() takes by
    make(layer); returns how many were replaced."""
    import bitsandbytes as bnb

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit) and accept(child):
                setattr(parent, name, make(child))
                n += 1
    return n


def replace_4bit(model) -> int:
    """Every supported 4-bit layer by an NF4Linear on the same storage; returns how many."""
    return swap_4bit(model, NF4Linear, supported)
