"""The training speedups change speed and memory, never the numbers."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lib import chunked_loss, collate, data, models, params, speedups, trainable
from lib.trainer import AnswerLossTrainer, answer_loss
from tests.tiny_model import TINY


def _plain(hidden, weight, targets, cap):
    z = F.linear(hidden, weight).float()
    z = torch.tanh(z / cap) * cap if cap else z
    return F.cross_entropy(z, targets, reduction="none")


@pytest.mark.parametrize("cap", [None, 30.0])
def test_head_nll_equals_plain_cross_entropy(monkeypatch, cap):
    """Losses and the gradient w.r.t. the hidden states, over several chunks, equal the plain path's."""
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 7 * 50)  # 7 tokens a chunk: 3 chunks of 20 tokens
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=g)
    h = torch.randn(20, 16, generator=g) * 3
    targets = torch.randint(0, 50, (20,), generator=g)
    upstream = torch.rand(20, generator=g)  # a weighted sum, so each token's gradient scale matters
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ours, ref = chunked_loss.head_nll(h1, weight, targets, cap), _plain(h2, weight, targets, cap)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the evaluation path (no gradient kept)
        torch.testing.assert_close(chunked_loss.head_nll(h, weight, targets, cap), ref.detach(), rtol=1e-5, atol=1e-6)
    assert chunked_loss._chunks(20, 50) == [(0, 7), (7, 14), (14, 20)]


def test_head_nll_with_bias_or_trainable_head_takes_the_plain_path():
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(30, 8, generator=g), torch.randn(30, generator=g)
    h, targets = torch.randn(5, 8, generator=g), torch.randint(0, 30, (5,), generator=g)
    ref = F.cross_entropy(F.linear(h, weight, bias), targets, reduction="none")
    torch.testing.assert_close(chunked_loss.head_nll(h, weight, targets, bias=bias), ref)
    trainable = weight.clone().requires_grad_()
    chunked_loss.head_nll(h, trainable, targets).sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_head_nll_bf16_autocast_matches_model_head():
    """Under bf16 autocast (the Trainer's bf16 mode) the chunked loss rounds as the plain head does."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 32, generator=g)
    h = torch.randn(10, 32, generator=g)
    targets = torch.randint(0, 64, (10,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_loss.head_nll(h.requires_grad_(), weight, targets)
        ref = _plain(h, weight, targets, None)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def _tiny_nf4(compute_dtype="float32"):
    return models.load_model(TINY, "nf4", compute_dtype, "cpu")


def test_cache_dequantized_gives_the_same_logits_and_replaces_every_4bit_layer():
    import bitsandbytes as bnb

    model = _tiny_nf4()
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():  # eval mode: no CPU repacking either (lib.models.no_cpu_repack)
        before = model(ids).logits
        assert speedups.cache_dequantized(model) == n4 > 0
        after = model(ids).logits
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def _step(p, feats, tok, watch=None):
    """Loss and LoRA gradients of one training step of the tiny model under params p. watch, a dict, gets
    the calls of the layers' compiled code ("calls"), the numel of every tensor autograd saved in the
    forward ("saved") and the batch's tokens ("tokens")."""
    torch.manual_seed(0)
    model = trainable.make_trainable(_tiny_nf4(p.compute_dtype), p)
    model.train()
    calls, saved = [], []
    for layer in speedups.decoder_layers(model) if watch is not None else ():
        if layer._compiled_call_impl is not None:
            run = layer._compiled_call_impl
            layer._compiled_call_impl = lambda *a, _run=run, **kw: calls.append(1) or _run(*a, **kw)
    batch = collate.PadCollator(tok.pad_token_id)(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.compute_dtype == "bfloat16"), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = answer_loss(model, **batch)
    loss.backward()
    grads = {n: x.grad.clone() for n, x in model.named_parameters() if x.requires_grad}
    if watch is not None:
        watch.update(calls=len(calls), saved=saved, tokens=batch["input_ids"].numel())
    return model, loss.item(), grads


def test_speedups_keep_loss_and_gradients(tiny):
    """cache_dequantized and keep_frozen_dtype: one step's loss and LoRA gradients equal the seed path's."""
    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)
    seed = params.TrainParams(model=TINY, compute_dtype="float32")
    _, loss0, g0 = _step(seed, feats, tok)
    for kw in ({"cache_dequantized": True}, {"keep_frozen_dtype": True, "cache_dequantized": True}):
        _, loss, g = _step(params.TrainParams(model=TINY, compute_dtype="float32", **kw), feats, tok)
        assert loss == pytest.approx(loss0, rel=1e-6), kw
        assert g.keys() == g0.keys()
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], rtol=1e-4, atol=1e-7)


def test_keep_frozen_dtype_leaves_bf16_weights_bf16(tiny):
    """peft's preparation makes the frozen embeddings fp32; keep_frozen_dtype leaves them bf16."""
    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)
    dtypes = {}
    for keep in (False, True):
        p = params.TrainParams(model=TINY, compute_dtype="bfloat16", keep_frozen_dtype=keep)
        model, loss, grads = _step(p, feats, tok)
        dtypes[keep] = model.get_base_model().get_input_embeddings().weight.dtype
        assert torch.isfinite(torch.tensor(loss))  # B starts at 0, so at step 0 only the B matrices get a gradient
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert dtypes == {False: torch.float32, True: torch.bfloat16}


def test_answer_loss_runs_lora_under_bf16_autocast(tiny):
    """With bf16 compute the answer-only loss runs under autocast, as the model's own forward does
    under the Trainer (else the LoRA matmuls run in fp32); with fp32 compute it does not."""
    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=2), "course", 2048)
    batch = collate.PadCollator(tok.pad_token_id)(feats)
    model = trainable.make_trainable(_tiny_nf4("bfloat16"), params.TrainParams(model=TINY, compute_dtype="bfloat16",
                                                                      keep_frozen_dtype=True))
    seen = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_a.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for bf16 in (True, False):
        loss = answer_loss(model, **batch, bf16=bf16)
        assert torch.isfinite(loss)
    assert seen == [torch.bfloat16, torch.float32]


def test_compiled_layers_evaluate_eagerly_and_uncompile(tiny, sample_eval):
    """Evaluation inside speedups.eager() compiles nothing and scores as the plain model does;
    uncompile() restores plain calls."""
    from torch._dynamo.utils import counters

    from lib import evaluate, prompts

    _, _, tok = tiny
    p = params.TrainParams(model=TINY, compile=True)
    model = trainable.make_trainable(_tiny_nf4(), p)
    layers = speedups.decoder_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    recs = sample_eval[:3]
    args = ([prompts.build(r["instruction"]) for r in recs], [r["output"] for r in recs])
    before = sum(counters["stats"].values())
    with speedups.eager():
        compiled = evaluate.perplexities(model, tok, *args, progress=False).nll
    assert sum(counters["stats"].values()) == before  # dynamo never ran
    speedups.uncompile(model)
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert compiled == pytest.approx(evaluate.perplexities(model, tok, *args, progress=False).nll, rel=1e-6)


def _layer_4bit(kind, nested=True, bias=False):
    """A bitsandbytes 4-bit Linear (96 x 256, bf16 compute) quantized on the CPU; frozen."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(256, 96, bias=bias, compute_dtype=torch.bfloat16, compress_statistics=nested,
                              quant_type=kind)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 256) * 0.02, requires_grad=False, compress_statistics=nested,
                                     quant_type=kind)._quantize("cpu")
    if bias:
        layer.bias.requires_grad_(False)
    return layer


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_linear_dequantizes_as_bitsandbytes_eager_and_compiled(nested):
    """NF4Linear's weight, output and input gradient equal bitsandbytes' exactly, in eager mode (its
    kernels) and compiled (torch ops fused by inductor); its storage is the same memory."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from lib import nf4

    torch.manual_seed(0)
    layer = _layer_4bit("nf4", nested, bias=True)
    lean = nf4.NF4Linear(layer)
    assert lean.packed.data_ptr() == layer.weight.data_ptr() and not isinstance(lean.packed, bnb.nn.Params4bit)
    assert list(lean.buffers()) == [] and [x.numel() for x in lean.parameters()] == [x.numel() for x in layer.parameters()]
    ref = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(lean.weight_dequantized(), ref)
    assert torch.equal(torch.compile(lambda: lean.weight_dequantized())(), ref)
    x = torch.randn(5, 256, requires_grad=True)
    for fn in (lean, torch.compile(lean)):
        out0, out1 = layer(x), fn(x)
        g0, = torch.autograd.grad(out0.square().sum(), x)
        g1, = torch.autograd.grad(out1.square().sum(), x)
        assert out1.dtype == out0.dtype == torch.float32
        assert torch.equal(out1, out0) and torch.equal(g1, g0)


def test_lean_nf4_replaces_every_4bit_layer_and_keeps_the_step(tiny):
    """lean_nf4: no bitsandbytes layer is left, and one training step's loss and LoRA gradients are
    the seed path's."""
    import bitsandbytes as bnb

    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)
    base = dict(model=TINY, compute_dtype="float32", keep_frozen_dtype=True)
    _, loss0, g0 = _step(params.TrainParams(**base), feats, tok)
    model, loss, g = _step(params.TrainParams(**base, lean_nf4=True), feats, tok)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert loss == loss0
    assert g.keys() == g0.keys() and all(torch.equal(g[k], g0[k]) for k in g0)


@pytest.mark.parametrize("flag", ["cache_dequantized", "lean_nf4"])
def test_4bit_speedups_need_nf4(flag):
    with pytest.raises(params.ParamsError, match=f"{flag} needs quantization: nf4"):
        params.TrainParams(model=TINY, quantization="none", **{flag: True}).check()


def test_lean_nf4_excludes_the_cache():
    with pytest.raises(params.ParamsError, match="exclude each other"):
        params.TrainParams(model=TINY, lean_nf4=True, cache_dequantized=True).check()


def test_compile_mode_reaches_torch_compile_and_needs_compile(monkeypatch):
    """The recipe's compile_mode is what each decoder layer is compiled with, cpp_wrapper joins the mode's
    own options; either without compile, an unknown mode or a CUDA-graph mode (it crashed training on an
    H100) is an error naming the key."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    p = params.TrainParams(model=TINY, compile=True, compile_mode="max-autotune-no-cudagraphs")
    p.check()
    model = trainable.make_trainable(_tiny_nf4(), p)
    n = len(speedups.decoder_layers(model))
    assert n > 0 and seen == [("LlamaDecoderLayer", {"dynamic": True, "mode": "max-autotune-no-cudagraphs"})] * n
    seen.clear()
    trainable.make_trainable(_tiny_nf4(), dataclasses.replace(p, cpp_wrapper=True))
    options = {"max_autotune": True, "coordinate_descent_tuning": True, "cpp_wrapper": True}  # torch's mode table
    assert seen == [("LlamaDecoderLayer", {"dynamic": True, "options": options})] * n
    for mode in ("reduce-overhead", "max-autotune"):
        for gc in (True, False):
            with pytest.raises(params.ParamsError, match=f"compile_mode: {mode} .CUDA graphs. does not train"):
                params.TrainParams(model=TINY, compile=True, compile_mode=mode, gradient_checkpointing=gc).check()
    with pytest.raises(params.ParamsError, match="compile_mode: max-autotune-no-cudagraphs needs compile: true"):
        params.TrainParams(model=TINY, compile_mode="max-autotune-no-cudagraphs").check()
    with pytest.raises(params.ParamsError, match="cpp_wrapper: True needs compile: true"):
        params.TrainParams(model=TINY, cpp_wrapper=True).check()
    with pytest.raises(params.ParamsError, match="compile_mode"):
        params.TrainParams(model=TINY, compile=True, compile_mode="fast").check()


def _assert_same_step(loss, g, loss0, g0):
    """One step's loss and LoRA gradients are the reference step's (float32, compiled code's rounding)."""
    assert loss == pytest.approx(loss0, rel=1e-5)
    assert g.keys() == g0.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-4, atol=1e-6)


def test_cpp_wrapper_keeps_loss_and_gradients(tiny):
    """Layers compiled with inductor's C++ launcher train as the plain model does: one step's loss and
    LoRA gradients (the reference: no compilation at all)."""
    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=3), "course", 2048)
    ref = params.TrainParams(model=TINY, compute_dtype="float32", gradient_checkpointing=False)
    _, loss0, g0 = _step(ref, feats, tok)
    _, loss, g = _step(dataclasses.replace(ref, compile=True, cpp_wrapper=True), feats, tok)
    _assert_same_step(loss, g, loss0, g0)


@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_compiled_recompute_keeps_the_step_and_runs_each_layer_once(tiny, cpp_wrapper):
    """compiled_recompute: one step's loss and LoRA gradients equal the uncompiled checkpointed step's. Each
    layer's compiled code runs once a step (its recompute is inside the compiled backward), where HF's
    checkpoint around it runs it twice (the forward, then the recompute); and it still checkpoints: no
    MLP activation (tokens x intermediate width) is kept for the backward, as without checkpointing.
    With the C++ launcher too: recomputing the attention (its kernels tagged random) made AOTAutograd
    replay the RNG state with an op that launcher cannot emit (an InductorError, on CPU as on the H100)."""
    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=3), "course", 2048)
    ref = params.TrainParams(model=TINY, compute_dtype="float32")
    _, loss0, g0 = _step(ref, feats, tok)
    fast, hf, whole = {}, {}, {}
    model, loss, g = _step(dataclasses.replace(ref, compile=True, compiled_recompute=2, cpp_wrapper=cpp_wrapper),
                           feats, tok, fast)
    _assert_same_step(loss, g, loss0, g0)
    mlp = fast["tokens"] * model.config.intermediate_size  # one MLP activation's numel
    assert fast["calls"] == 2 and mlp not in fast["saved"]  # the tiny model's 2 layers, once each
    if cpp_wrapper:
        return
    _step(dataclasses.replace(ref, compile=True), feats, tok, hf)
    _step(dataclasses.replace(ref, compile=True, gradient_checkpointing=False), feats, tok, whole)
    assert hf["calls"] == 4 and mlp in whole["saved"]


def test_compiled_recompute_of_the_first_layers_only(tiny):
    """compiled_recompute: 1 of the tiny model's 2 checkpointed layers: layer 0 recomputes inside its
    compiled code (its code runs once), layer 1 keeps HF's checkpoint (twice): 3 calls a step, and the
    step is the uncompiled checkpointed one's. More layers than are checkpointed is an error naming both."""
    _, _, tok = tiny
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=3), "course", 2048)
    ref = params.TrainParams(model=TINY, compute_dtype="float32")
    _, loss0, g0 = _step(ref, feats, tok)
    part = {}
    _, loss, g = _step(dataclasses.replace(ref, compile=True, compiled_recompute=1), feats, tok, part)
    assert part["calls"] == 3
    _assert_same_step(loss, g, loss0, g0)
    with pytest.raises(ValueError, match="compiled_recompute: 2 is more than the model's 1 checkpointed"):
        trainable.make_trainable(_tiny_nf4(), dataclasses.replace(ref, compile=True, checkpointed_layers=1,
                                                                  compiled_recompute=2))


def test_compiled_recompute_needs_compile_and_checkpointing():
    with pytest.raises(params.ParamsError, match="compiled_recompute: 2 needs compile: true"):
        params.TrainParams(model=TINY, compiled_recompute=2).check()
    with pytest.raises(params.ParamsError, match="compiled_recompute: 2 needs gradient_checkpointing: true .* set "
                                                 "compiled_recompute: 0"):
        params.TrainParams(model=TINY, compile=True, compiled_recompute=2, gradient_checkpointing=False).check()
    with pytest.raises(params.ParamsError, match="'compiled_recompute' must be >= 0"):
        params.TrainParams(model=TINY, compile=True, compiled_recompute=-1).check()


def test_floating_point_ops_is_hf_value(tiny):
    """The cached count gives HF's own number."""
    from transformers import Trainer

    model, _, _ = tiny
    trainer = AnswerLossTrainer.__new__(AnswerLossTrainer)
    trainer.model = model
    inputs = {"input_ids": torch.ones(3, 17, dtype=torch.long)}
    assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) > 0


def test_replace_4bit_leaves_what_it_does_not_support():
    """FP4 layers keep bitsandbytes' path; NF4 ones are replaced."""
    import bitsandbytes as bnb

    from lib import nf4

    model = torch.nn.Sequential(_layer_4bit("nf4"), _layer_4bit("fp4"))
    assert nf4.replace_4bit(model) == 1
    assert isinstance(model[0], nf4.NF4Linear) and isinstance(model[1], bnb.nn.Linear4bit)


def test_head_loss_is_checked_before_anything_runs():
    with pytest.raises(params.ParamsError, match="head_loss"):
        params.TrainParams(head_loss="fused")
    if not torch.cuda.is_available():
        with pytest.raises(params.ParamsError, match="head_loss: cce needs a CUDA GPU"):
            params.TrainParams(head_loss="cce")


def test_the_recipes_head_loss_reaches_the_loss(tiny, tmp_path, monkeypatch):
    """make_trainer hands the recipe's head_loss to the answer loss (a stand-in for CCE here: its kernels
    need CUDA; tests/test_gpu.py compares the real one with the chunked loss)."""
    from lib import evaluate
    from lib.trainer import make_trainer

    calls = []

    def stand_in(hidden, weight, targets, cap=None, bias=None):
        calls.append(len(targets))
        return chunked_loss.head_nll(hidden, weight, targets, cap, bias)

    monkeypatch.setitem(evaluate.HEAD_LOSSES, "cce", stand_in)
    model, _, tok = tiny
    recs = data.load_split("data/sample", "train", limit=5)
    feats, _, _ = collate.encode_examples(tok, recs, "course", 2048)
    batch = collate.PadCollator(tok.pad_token_id)(feats)
    p = params.TrainParams(model=TINY, max_steps=1)
    p.head_loss = "cce"  # past the check, which needs CUDA
    trainer = make_trainer(model, tok, feats, recs, p, tmp_path, collate.PadCollator(tok.pad_token_id))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        ref = answer_loss(model, **batch)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    assert calls == [n_answer] and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_training_keeps_attention_off_cudnn(tiny, tmp_path):
    """Making a trainer switches cuDNN's attention off (its backward gave NaN gradients on an H100:
    pytorch/pytorch#196678); tests/test_gpu.py checks the failing shape itself on a GPU."""
    from lib.trainer import make_trainer

    model, _, tok = tiny
    recs = data.load_split("data/sample", "train", limit=4)
    feats, _, _ = collate.encode_examples(tok, recs, "course", 2048)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        make_trainer(model, tok, feats, recs, params.TrainParams(model=TINY, max_steps=1), tmp_path,
                     collate.PadCollator(tok.pad_token_id))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
