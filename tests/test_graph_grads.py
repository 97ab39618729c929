"""lib/graph_grads.py against torch's own per-weight operations on the same gradients."""
import pytest
import torch

from lib.graph_grads import GraphGrads


def _model(second=torch.bfloat16):
    """Trained weights of two dtypes, in an order that is not the dtypes' (the buffers sort them), and a frozen one."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5).to(second), torch.nn.Linear(5, 2))
    m[2].bias.requires_grad_(False)
    for w in m.parameters():
        if w.requires_grad:
            w.grad = torch.randn_like(w)
    return m


def _trained(m):
    return [w for w in m.parameters() if w.requires_grad]


# all fp32 (LoRA's weights): the same norm to fp32 rounding; with a bf16 weight, torch takes that weight's
# norm in bf16 and the flat buffer its dtype's in one: bf16 rounding apart
@pytest.mark.parametrize("second, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left as is
def test_clip_is_torchs_clip_grad_norm_over_the_weights(max_norm, second, rtol):
    m, ref = _model(second), _model(second)
    expected = torch.nn.utils.clip_grad_norm_(_trained(ref), max_norm)
    g = GraphGrads(m)
    g.take()
    norm = g.clip(max_norm)
    torch.testing.assert_close(norm, expected, rtol=rtol, atol=0)
    assert (norm > max_norm) == (max_norm == 0.5)  # the first clips, the second not
    for w, r in zip(_trained(m), _trained(ref)):
        torch.testing.assert_close(w.grad, r.grad, rtol=rtol, atol=0)


def test_take_copies_every_gradient_into_one_buffer_per_dtype():
    m, ref = _model(), _model()
    g = GraphGrads(m)
    g.take()
    assert [f.dtype for f in g.flats] == [torch.bfloat16, torch.float32]
    assert [f.numel() for f in g.flats] == [3 * 5 + 5, 4 * 3 + 3 + 5 * 2]  # the frozen bias in neither
    for w, r in zip(_trained(m), _trained(ref)):
        assert torch.equal(w.grad, r.grad)
        flat = g.flats[0] if w.dtype == torch.bfloat16 else g.flats[1]
        assert w.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    # a later micro-batch's gradient adds into the buffer, as autograd's accumulation does into .grad
    x = torch.randn(2, 4)
    m[2](m[1](m[0](x).bfloat16()).float()).sum().backward()
    ref[2](ref[1](ref[0](x).bfloat16()).float()).sum().backward()
    for w, r in zip(_trained(m), _trained(ref)):
        torch.testing.assert_close(w.grad, r.grad, rtol=0, atol=0)
    assert g.flats[1].abs().sum() > 0 and not g.fresh()


def test_zero_grad_drops_the_trained_weights_gradients():
    m = _model()
    m[2].bias.grad = torch.ones(2)  # a frozen weight's gradient is not its business (it never has one here)
    g = GraphGrads(m)
    g.zero_grad()
    assert g.fresh() and all(w.grad is None for w in _trained(m)) and m[2].bias.grad is not None


def test_take_says_which_weights_got_no_gradient():
    m = _model()
    m[1].weight.grad = None
    with pytest.raises(RuntimeError, match="1 trained weights got no gradient"):
        GraphGrads(m).take()
