"""Attention over packed sequences by their boundaries (varlen) instead of a block-diagonal mask.

With packing, transformers' SDPA path finds the sequences in position_ids (a host-GPU sync), builds a
[rows, 1, T, T] mask and runs a masked kernel that computes every (query, key) pair of a row, other
sequences' and future ones included: for the course's 16-record micro-batches in rows of 512 tokens,
6.5x the pairs a causal per-sequence attention needs, and every row padded to the longest. Here the
collator hands over the boundaries (`seq_bounds`, cumulative lengths over the flattened rows, and the
longest `seq_max`) and each sequence attends causally to itself only: on CUDA in bf16/fp16 with torch's
flash-attention varlen kernel (only the pairs inside each sequence are computed, so a micro-batch is one
row without row padding); elsewhere with SDPA and a mask made from the same boundaries (same numbers,
no speed-up: the CPU path and the tests' reference).

Training switches the model's attention to this one for its steps (`training`), forward and checkpointed
recompute alike; evaluation and generation keep SDPA and their padding masks.
"""
import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "cct_varlen"  # no mask function is registered under it: transformers then builds no mask at all
ONE_OP = "cct_varlen_one_op"  # an attention module's flag: attend through lib/varlen_op (set there)

# torch's flash kernel taking each sequence's bounds; its autograd formula is aten's own (C++). torch's
# public varlen_attn wraps the same kernel in a Python custom op: measured on an H100, that Python cost
# ~0.5 ms of host time per layer and step (forward + backward), which a host-bound step pays in full
_FLASH = getattr(torch.ops.aten, "_flash_attention_forward", None)
_WINDOWED = _FLASH is not None and "window_size_left" in str(_FLASH.default._schema)  # torch >= 2.10


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
              softcap=None, seq_bounds=None, seq_max=None, **kwargs):
    """transformers' attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    if seq_bounds is None:
        raise ValueError(f"attention {NAME!r} needs the packed sequences' bounds (seq_bounds from the collator "
                         "with varlen_attention: true); only training steps switch to it")
    if dropout or softcap is not None:
        raise ValueError(f"varlen_attention: attention dropout ({dropout}) and logit soft-capping ({softcap}) "
                         "are not supported; turn varlen_attention off for this model")
    b, h, t, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    scale = scaling if scaling is not None else d ** -0.5
    if getattr(module, ONE_OP, False):  # a layer whose recompute is compiled (lib/varlen_op)
        out = torch.ops.cct.varlen_attention(q, k, v, seq_bounds, seq_max, scale, sliding_window)[0]
    elif _flash_ok(q):
        out = _flash(q, k, v, seq_bounds, seq_max, scale, sliding_window)[0]
    else:
        out = _masked(q, k, v, seq_bounds, scale, sliding_window)
    return out.view(b, t, h, d), None


def _flash_ok(q) -> bool:
    """torch's flash kernel: CUDA, half precision, head size up to 256 in steps of 8."""
    d = q.shape[-1]
    return _WINDOWED and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d <= 256 and d % 8 == 0


def kernel_bounds(q, cu, window) -> tuple[torch.Tensor, int]:
    """What the flash kernels (forward and backward) take for the bounds and the window: cu as int32 on q's
    device, and the left window, keys at most this far back (-1: all), where transformers' `window` counts
    keys less than it back."""
    return cu.to(device=q.device, dtype=torch.int32), window - 1 if window is not None else -1


def _flash(q, k, v, cu, longest, scale, window):
    """Causal attention within each sequence (keys fewer than `window` back); the kernel takes GQA as is.
    Returns the output and its log-sum-exp (lib.varlen_op's backward takes it)."""
    cu, left = kernel_bounds(q, cu, window)
    # as torch's varlen_attn calls it: causal is the window (-1, 0); a sliding window is (left, 0)
    return _FLASH(q, k, v, cu, cu, longest, longest, 0.0, left == -1, False, scale=scale, window_size_left=left,
                  window_size_right=0)[:2]


def mask(cu, n: int, device, window) -> torch.Tensor:
    """[n, n]: query i sees key j iff both lie in one sequence (bounds cu) and j <= i (< window back)."""
    pos = torch.arange(n, device=device)
    seq = torch.searchsorted(cu.to(device)[1:].contiguous(), pos, right=True)  # sequence of each token
    m = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        m &= pos[:, None] - pos[None, :] < window
    return m


def _masked(q, k, v, cu, scale, window):
    """The same attention with SDPA and mask()."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask(cu, q.shape[0], q.device, window), scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


AttentionInterface.register(NAME, attention)


def config_of(model):
    """The config the decoder layers read their attention implementation from (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


@contextlib.contextmanager
def training(model, on: bool):
    """Inside: the model attends with NAME (a training step: its forward and its backward's recompute,
    which reads the implementation again). Off: nothing changes."""
    if not on:
        yield
        return
    cfg = config_of(model)
    before = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = before
