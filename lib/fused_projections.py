"""LoRA projections that read the same input computed as one group (TrainParams.fuse_projections).

A decoder layer calls q_proj, k_proj and v_proj on the same hidden states, and gate_proj and up_proj on
the same MLP input. peft runs each LoRA projection on its own: base matmul, x @ A, (x A) @ B, add; and in
backward a matmul for the base's input gradient, four for the LoRA branch and an add per projection: many
small launches, each thin (r = 64) matmul reading the whole input. In a group:

- the frozen base weights are one matrix: one matmul for the group's base outputs and one for its
  input gradient (no adds). 16-bit weights are concatenated once and each projection's weight becomes a
  view of its rows (the same memory); NF4 weights are dequantized into one matrix on each call (in
  backward again, as lib/nf4.py does);
- the A matrices are one matrix too: x @ [A_q; A_k; A_v] reads x once, and so does its gradient.

Only the B matmuls stay per projection. The sums are the same (each output column is the same dot
product; the adds of the input gradients happen inside one matmul), so the loss moves at rounding level
only. Training mode only: evaluation and generation (few rows, where bitsandbytes' own 4-bit kernel
serves) call each projection as before. Measured on an H100 (benchmarks/README.md): 1.14x on a host-bound
step with peft's 4-bit LoRA layers (the study's 1.5B), 1.01x with its 16-bit ones, 0.96x on the GPU-bound
7B (inductor fuses the group's concatenation into the 4-bit lookup, a slower kernel); so off by default.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import nf4, speedups

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
FIELDS = 8  # an NF4Linear's fields _Group4bit takes: packed, absmax, absmax2, code2, offset, code, blocksize, shape


class _Group4bit(torch.autograd.Function):
    """x @ W.t() + bias for the rows of several NF4Linear layers stacked; W dequantized again in backward
    (never saved), as nf4._Matmul does for one layer. flat: each layer's _nf4_fields, one after another."""

    @staticmethod
    def forward(ctx, x, bias, *flat):
        layers = [flat[i:i + FIELDS] for i in range(0, len(flat), FIELDS)]
        ctx.save_for_backward(*[t for f in layers for t in f[:6]])  # absmax2, code2, offset may be None
        ctx.sizes = [f[6:] for f in layers]
        return F.linear(x, _stacked(layers, x.dtype, fuse=None), bias)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        layers = [saved[6 * i:6 * i + 6] + tuple(sizes) for i, sizes in enumerate(ctx.sizes)]
        return (grad @ _stacked(layers, grad.dtype, fuse=False), None) + (None,) * (FIELDS * len(layers))


def _stacked(layers, dtype, fuse):
    return torch.cat([nf4.dequantize(*f, dtype, fuse=fuse) for f in layers])


def _nf4_fields(layer):
    return (layer.packed, layer.absmax, layer.absmax2, layer.code2, layer.offset, layer.code, layer.blocksize,
            layer.shape)


class Group:
    """One group of peft LoRA Linear layers on the same input (one adapter, no dropout, no DoRA)."""

    def __init__(self, lora_layers):
        self.layers = list(lora_layers)
        bases = [m.base_layer for m in self.layers]
        self.sizes = [b.out_features for b in bases]
        self.ranks = [m.lora_A["default"].out_features for m in self.layers]
        self.nf4 = isinstance(bases[0], nf4.NF4Linear)
        # looked up once: an import inside the compiled layer broke its graph at every call where bitsandbytes
        # is missing (peft's 4-bit class then fails to import): 0.24x on an H100 without bitsandbytes
        self.four_bit = [type(m) is not _lora_classes()[0] for m in self.layers]
        # the stacked 16-bit weight and bias (each layer's own are views of their rows)
        self.weight, self.bias = (None, None) if self.nf4 else (_share_storage(bases, "weight"),
                                                                _share_storage(bases, "bias"))
        self.pending = None  # (input, outputs not yet handed out) between the group's first and last call

    def forward(self, i: int, x):
        """Projection i's output for x: all of the group's are computed at projection 0's call."""
        if i == 0:
            self.pending = (x, self.compute(x))
        elif self.pending is None or self.pending[0] is not x:  # not called as a group: each on its own
            return type(self.layers[i]).forward(self.layers[i], x)
        out = self.pending[1][i]
        if i == len(self.layers) - 1:
            self.pending = None  # no reference kept past the layer (memory)
        return out

    def compute(self, x):
        base = self._base(x).split(self.sizes, dim=-1)
        a = torch.cat([m.lora_A["default"].weight for m in self.layers])
        xa = F.linear(x.to(a.dtype), a).split(self.ranks, dim=-1)  # peft casts x to A's dtype too
        return [_add_lora(m, b, h, four_bit) for b, h, m, four_bit in zip(base, xa, self.layers, self.four_bit)]

    def _base(self, x):
        first = self.layers[0].base_layer
        if self.nf4:
            dtype = first.compute_dtype
            biases = [m.base_layer.bias for m in self.layers]
            bias = None if biases[0] is None else torch.cat(biases).to(dtype)
            flat = [t for m in self.layers for t in _nf4_fields(m.base_layer)]
            return _Group4bit.apply(x.to(dtype), bias, *flat).to(x.dtype)
        if isinstance(first, speedups.DequantizedLinear):  # computes in its weight's dtype, as it does alone
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def _add_lora(module, result, xa, four_bit: bool):
    """result + B (x A) * scaling, rounded where peft's class of module (four_bit: its 4-bit one) rounds."""
    out = module.lora_B["default"](xa) * module.scaling["default"]
    if four_bit:  # peft's 4-bit class casts the branch to the result's dtype before adding, without autocast
        return result + (out if torch.is_autocast_enabled() else out.to(result.dtype))
    return (result + out).to(result.dtype)


@functools.cache
def _lora_classes() -> tuple:
    """peft's LoRA Linear classes: the 16-bit one first, then the 4-bit one where bitsandbytes is installed."""
    from peft.tuners.lora.layer import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes
        return (Linear,)
    return Linear, Linear4bit


def _share_storage(bases, name):
    """Each frozen 16-bit tensor `name` of bases becomes a view of its rows in one stacked tensor, returned
    (None without biases)."""
    if getattr(bases[0], name) is None:
        return None
    stacked = torch.cat([getattr(b, name).data for b in bases])
    start = 0
    for b in bases:
        setattr(b, name, nn.Parameter(stacked[start:start + b.out_features], requires_grad=False))
        start += b.out_features
    return stacked


def fusable(lora_layers) -> str:
    """Why these peft layers cannot form a group ('' if they can)."""
    if not all(type(m) in _lora_classes() for m in lora_layers):
        return "not all are peft LoRA Linear layers"
    if any(list(m.lora_A) != ["default"] or m.lora_variant or m.merged or m.disable_adapters for m in lora_layers):
        return "one adapter, no variant (DoRA), unmerged"
    if any(not isinstance(m.lora_dropout["default"], nn.Identity) for m in lora_layers):
        return "LoRA dropout draws a mask per projection"
    bases = [m.base_layer for m in lora_layers]
    kinds = {type(b) for b in bases}
    if len(kinds) != 1 or not (kinds <= {nn.Linear, speedups.DequantizedLinear, nf4.NF4Linear}):
        return f"base layers {sorted(k.__name__ for k in kinds)} (16-bit Linear or lean_nf4's NF4Linear)"
    if len({b.in_features for b in bases}) != 1 or len({b.bias is None for b in bases}) != 1:
        return "different input sizes or bias presence"
    if len({(b.weight.dtype, b.weight.device) for b in bases if not isinstance(b, nf4.NF4Linear)}) > 1:
        return "different weight dtypes"
    return ""


def fuse_projections(model) -> int:
    """Group the LoRA projections that share an input in every decoder layer (those with an adapter: with
    target_modules [q_proj, v_proj] the group is q and v); returns how many groups. Raises ValueError when
    a layer's adapted projections cannot be grouped (what fusable() says)."""
    n = 0
    for layer in speedups.decoder_layers(model):
        for block_name, names in GROUPS.items():
            block = getattr(layer, block_name, None)
            adapted = [nm for nm in names if hasattr(getattr(block, nm, None), "lora_A")]
            if len(adapted) < 2:  # nothing to group
                continue
            members = [getattr(block, nm) for nm in adapted]
            why = fusable(members)
            if why:
                raise ValueError(f"fuse_projections: {block_name}'s {', '.join(adapted)} cannot be fused: {why}")
            group = Group(members)
            for i, m in enumerate(members):
                m.forward = _member_forward(group, i, m)
            n += 1
    return n


def _member_forward(group, i, module):
    def forward(x, *args, **kwargs):
        if args or kwargs or not module.training:
            return type(module).forward(module, x, *args, **kwargs)
        return group.forward(i, x)

    return forward
