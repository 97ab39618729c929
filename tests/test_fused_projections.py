"""fuse_projections: the grouped LoRA projections give peft's per-projection numbers."""
import dataclasses

import pytest
import torch

from lib import collate, data, fused_projections, models, params, trainable
from lib.trainer import answer_loss
from tests.tiny_model import TINY

METHODS = {"lora": dict(quantization="none"), "lean_nf4": dict(lean_nf4=True, keep_frozen_dtype=True),
           "cache_dequantized": dict(cache_dequantized=True, keep_frozen_dtype=True)}


@pytest.fixture(scope="module")
def feats(tiny):
    _, _, tok = tiny
    return collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)[0], tok


def _model(p, device="cpu"):
    torch.manual_seed(0)
    model = trainable.make_trainable(models.load_model(TINY, p.quantization, p.compute_dtype, device), p)
    g = torch.Generator().manual_seed(1)
    for name, w in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the branch would add nothing and A would get no gradient
            w.data.copy_(torch.randn(w.shape, generator=g).to(w.device) * 0.1)
    return model.train()


def _step(p, feats, tok, device="cpu"):
    model = _model(p, device)
    batch = {k: v.to(device) for k, v in collate.PadCollator(tok.pad_token_id)(feats).items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=p.compute_dtype == "bfloat16"):
        loss = answer_loss(model, **batch)
    loss.backward()
    return model, loss.item(), {n: w.grad.clone() for n, w in model.named_parameters() if w.requires_grad}


def same_step(ref, feats, tok, rtol=1e-5, device="cpu"):
    """One step with and without fuse_projections: the same loss and LoRA gradients (to rtol)."""
    _, loss0, g0 = _step(ref, feats, tok, device)
    model, loss, g = _step(dataclasses.replace(ref, fuse_projections=True), feats, tok, device)
    assert loss == pytest.approx(loss0, rel=rtol)
    assert g.keys() == g0.keys() and len(g0) > 0
    assert all(g0[k].abs().sum() > 0 for k in g0)  # every A and B has a gradient to compare
    for k in g0:
        # elementwise against the tensor's scale: bf16 rounds near-zero entries differently
        torch.testing.assert_close(g[k], g0[k], rtol=rtol * 10, atol=rtol * g0[k].abs().max().item())
    return model


@pytest.mark.parametrize("method", METHODS)
def test_fused_step_equals_peft_per_projection(feats, method):
    """One training step's loss and every LoRA gradient equal peft's, for 16-bit, lean NF4 and cached
    dequantized base weights; two groups a layer (q/k/v and gate/up)."""
    model = same_step(params.TrainParams(model=TINY, compute_dtype="float32", **METHODS[method]), *feats)
    grouped = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(grouped) == (3 + 2) * 2  # q/k/v and gate/up in each of the tiny model's two layers


def test_fused_step_compiled_and_checkpointed(feats):
    """Compiled layers (the group's calls traced by dynamo) and reentrant checkpointing (the layer's
    forward runs twice) give the same step."""
    base = params.TrainParams(model=TINY, compute_dtype="float32", lean_nf4=True, keep_frozen_dtype=True)
    same_step(dataclasses.replace(base, gradient_checkpointing=False, compile=True), *feats)
    same_step(base, *feats)  # checkpointing is on by default


def test_fused_step_under_bf16_autocast(feats):
    """bf16 compute (the recipes' own): the same step to bf16 rounding."""
    same_step(params.TrainParams(model=TINY, compute_dtype="bfloat16", quantization="none"), *feats, rtol=1e-2)


def test_fused_weights_share_storage_and_the_adapter_is_unchanged(tmp_path, monkeypatch):
    """16-bit base weights become views of one stacked tensor (no extra memory); the saved adapter has
    the same tensors under the same names; evaluation (eval mode) calls each projection itself."""
    p = params.TrainParams(model=TINY, compute_dtype="float32", quantization="none")
    plain = _model(p)
    fused = _model(dataclasses.replace(p, fuse_projections=True))
    attn = fused.get_base_model().model.layers[0].self_attn
    q, k, v = (attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight, attn.v_proj.base_layer.weight)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert plain.state_dict().keys() == fused.state_dict().keys()
    for name, w in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], w), name
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    plain.eval(), fused.eval()
    calls = []
    compute = fused_projections.Group.compute
    monkeypatch.setattr(fused_projections.Group, "compute", lambda self, x: calls.append(1) or compute(self, x))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=0, atol=0)
        assert calls == []  # eval mode: per projection, as peft
        fused.train()
        fused(ids)
    assert len(calls) == 4  # training mode: once a group
    fused.save_pretrained(tmp_path / "f")
    plain.save_pretrained(tmp_path / "p")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "f" / "adapter_model.safetensors"), load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_projection_called_alone_computes_itself():
    """k_proj called without q_proj first (not as a group) is peft's own k_proj."""
    p = params.TrainParams(model=TINY, compute_dtype="float32", quantization="none")
    plain, fused = _model(p), _model(dataclasses.replace(p, fuse_projections=True))
    x = torch.randn(3, 5, plain.config.hidden_size)
    pa, fa = (m.get_base_model().model.layers[1].self_attn for m in (plain, fused))
    torch.testing.assert_close(fa.k_proj(x), pa.k_proj(x), rtol=0, atol=0)
    # a group call on another input does not hand its outputs to this one
    fa.q_proj(torch.randn(3, 5, plain.config.hidden_size))
    torch.testing.assert_close(fa.v_proj(x), pa.v_proj(x), rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(lora_dropout=0.1), "lora_dropout: 0"),
    (dict(use_dora=True), "not with full_finetune or use_dora"),
    (dict(full_finetune=True, quantization="none"), "not with full_finetune or use_dora"),
    (dict(quantization="nf4"), "needs lean_nf4 or cache_dequantized"),
])
def test_fuse_projections_refuses_what_it_cannot_group(kw, match):
    with pytest.raises(params.ParamsError, match=match):
        params.TrainParams(model=TINY, fuse_projections=True, **kw).check()


def test_fuse_projections_names_a_model_it_cannot_group():
    """A base layer it does not know (bitsandbytes' own 4-bit layer) is an error naming the projections."""
    p = params.TrainParams(model=TINY, compute_dtype="float32")  # nf4 without lean_nf4: peft's bnb layers
    model = trainable.make_trainable(models.load_model(TINY, "nf4", "float32", "cpu"), p)
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj cannot be fused: base layers"):
        fused_projections.fuse_projections(model)


def test_compiled_group_has_no_graph_break_without_bitsandbytes(feats, monkeypatch):
    """The group looks peft's classes up when it is built, not in the compiled layer: where bitsandbytes is
    missing, peft's 4-bit module fails to import, and an import in the layer broke its graph at every call
    (0.24x on an H100)."""
    import sys

    import torch._dynamo
    from torch._dynamo.utils import counters

    p = params.TrainParams(model=TINY, compute_dtype="float32", quantization="none", compile=True,
                           gradient_checkpointing=False, fuse_projections=True)
    model = _model(p)
    monkeypatch.setitem(sys.modules, "peft.tuners.lora.bnb", None)  # importing it now fails, as without bitsandbytes
    torch._dynamo.reset()
    counters.clear()
    records, tok = feats
    batch = collate.PadCollator(tok.pad_token_id)(records)
    answer_loss(model, **batch).backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_only_the_adapted_projections_are_grouped(feats):
    """target_modules [q_proj, v_proj, up_proj]: q and v form the attention's group (k, without an adapter,
    stays peft's plain layer between their calls), the MLP has nothing to group; the step is peft's."""
    p = params.TrainParams(model=TINY, compute_dtype="float32", quantization="none",
                           target_modules=["q_proj", "v_proj", "up_proj"])
    model = same_step(p, *feats)
    grouped = sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "forward" in m.__dict__)
    assert grouped == ["q_proj", "q_proj", "v_proj", "v_proj"]  # two layers
