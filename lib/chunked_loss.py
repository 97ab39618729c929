"""Cross-entropy through the LM head, a chunk of tokens at a time: full-vocabulary logits never exist.

For a 262k vocabulary (Gemma) the logits of 1,000 answer tokens are 1 GB in fp32, and autograd keeps
their log-softmax and gradient besides. Here each chunk's logits are made, turned into per-token
losses and the gradient w.r.t. the hidden states at once, then freed; backward only scales the
stored [N, hidden] gradient. Values equal the plain path's (same dtypes, same formulas; tested).
"""
import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2 ** 26  # logits per chunk: 256 MB in fp32, whatever the vocabulary


def _chunks(n, vocab):
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _logits(h, weight, cap, bias=None):
    """fp32 logits of a chunk (matmul in the weight's dtype, as the model's own head does), soft-capped."""
    z = F.linear(h.to(weight.dtype), weight, bias).float()
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, t


class _HeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, cap):
        losses = torch.empty(len(targets), device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        for a, b in _chunks(len(targets), weight.shape[0]):
            z, t = _logits(hidden[a:b], weight, cap)
            lse = torch.logsumexp(z, dim=-1)
            losses[a:b] = lse - z.gather(1, targets[a:b, None])[:, 0]
            dz = torch.softmax(z, dim=-1)  # d loss_i / d z_i = softmax - onehot
            dz[torch.arange(b - a, device=dz.device), targets[a:b]] -= 1
            if t is not None:  # through z = cap * tanh(raw / cap)
                dz *= 1 - t * t
            grad[a:b] = dz.to(weight.dtype) @ weight  # same dtype as the plain path's matmul backward
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return (grad * grad_losses[:, None]).to(ctx.hidden_dtype), None, None, None


def cce_nll(hidden, weight, targets, cap=None, bias=None):
    """The same per-token NLL by Apple's cut-cross-entropy (Triton kernels: CUDA only; logits never leave
    SRAM, and its backward skips vocabulary entries whose softmax is negligible). The hand-written
    head_nll stays the reference it is tested against (tests/test_gpu.py)."""
    from cut_cross_entropy import linear_cross_entropy

    if bias is not None:
        raise ValueError("head_loss: cce takes an LM head without a bias")
    return linear_cross_entropy(hidden.to(weight.dtype), weight, targets, softcap=cap, reduction="none").float()


def head_nll(hidden, weight, targets, cap=None, bias=None):
    """Per-token NLL of targets given hidden states [N, d] and a frozen LM head weight [V, d].

    Differentiable w.r.t. hidden only (the head is frozen in LoRA training); a head that needs its own
    gradient, or has a bias, takes the plain path.
    """
    if weight.requires_grad or bias is not None:
        z, _ = _logits(hidden, weight, cap, bias)
        return F.cross_entropy(z, targets, reduction="none")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _HeadNLL.apply(hidden, weight, targets, cap)
    out = torch.empty(len(targets), device=hidden.device)
    for a, b in _chunks(len(targets), weight.shape[0]):
        z, _ = _logits(hidden[a:b], weight, cap)
        out[a:b] = F.cross_entropy(z, targets[a:b], reduction="none")
    return out


HEAD_LOSSES = {"chunked": head_nll, "cce": cce_nll}  # SpeedParams.head_loss
