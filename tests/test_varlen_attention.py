"""varlen_attention: packed sequences attend by their bounds, each as if alone."""
import contextlib
import dataclasses
import warnings

import pytest
import torch

from lib import collate, data, evaluate, models, params, prompts, speedups, trainable, varlen_attention
from lib.trainer import CurveCallback, make_trainer
from tests.tiny_model import TINY


def _reference(q, k, v, lengths, scale, window=None):
    """Attention of each sequence alone, written out: query i of a sequence weighs its keys j <= i
    (fewer than `window` back), softmax(q.k * scale); key/value heads shared by groups of query heads."""
    out, start, group = torch.zeros_like(q), 0, q.shape[1] // k.shape[1]
    for n in lengths:
        for i in range(n):
            for h in range(q.shape[1]):
                js = [j for j in range(n) if j <= i and (window is None or i - j < window)]
                keys = torch.stack([k[start + j, h // group] for j in js])
                w = torch.softmax(keys @ q[start + i, h] * scale, 0)
                out[start + i, h] = w @ torch.stack([v[start + j, h // group] for j in js])
        start += n
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_attention_is_each_sequence_alone(window):
    """Two rows of 10 flattened, five sequences (the second row's tail is its own), 4 query heads over 2
    key/value heads; with a sliding window of 3 too."""
    torch.manual_seed(0)
    lengths, (b, h, hkv, t, d) = [5, 3, 2, 6, 4], (2, 4, 2, 10, 8)
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    cu = torch.tensor([0, 5, 8, 10, 16, 20], dtype=torch.int32)
    out, _ = varlen_attention.attention(None, q, k, v, None, scaling=0.3, sliding_window=window, seq_bounds=cu,
                                        seq_max=6)
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    ref = _reference(*flat, lengths, 0.3, window).view(b, t, h, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_one_op_attention_and_its_gradients(window):
    """lib.varlen_op's op (the attention of layers whose recompute is compiled): its output is each sequence
    alone (the written-out reference) and its q/k/v gradients, by formula, are autograd's through that
    reference; torch's opcheck finds its fake and autograd registrations consistent with it."""
    import lib.varlen_op  # noqa: F401  registers the op

    torch.manual_seed(0)
    lengths = [5, 3, 2, 6, 4]
    q, k, v = (torch.randn(20, n, 8, dtype=torch.float64, requires_grad=True) for n in (4, 2, 2))
    cu = torch.tensor([0, 5, 8, 10, 16, 20], dtype=torch.int32)
    out = torch.ops.cct.varlen_attention(q, k, v, cu, 6, 0.3, window)[0]
    ref = _reference(q, k, v, lengths, 0.3, window)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, g_ref)
    torch.library.opcheck(torch.ops.cct.varlen_attention.default, (q, k, v, cu, 6, 0.3, window))


def test_compiled_recompute_keeps_no_attention_output_with_varlen(tiny, tmp_path, monkeypatch):
    """With varlen_attention, the layers whose recompute is compiled attend through lib.varlen_op's untagged
    op: the selective-checkpoint policy keeps no op's output (the attention is recomputed: no memory
    added); under SDPA's mask it keeps the attention's (a kernel torch tags random)."""
    from torch.utils.checkpoint import CheckpointPolicy

    seen, kept, policy = [], [], speedups._save_random_ops

    def spy(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        seen.append(str(op))
        if decision == CheckpointPolicy.MUST_SAVE:
            kept.append(str(op))
        return decision

    monkeypatch.setattr(speedups, "_save_random_ops", spy)
    torch._dynamo.reset()  # the policy runs when a layer is traced: no layer compiled by another test reused
    tok = tiny[2]
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=2), "course", 2048)[0]
    base = params.TrainParams(model=TINY, quantization="none", compute_dtype="float32", packing=True,
                              gradient_checkpointing=True, eval_steps=1000, save_steps=0, compile=True,
                              compiled_recompute=2)
    _trainer_step(dataclasses.replace(base, varlen_attention=True), feats, tok, tmp_path / "v")
    assert "cct.varlen_attention.default" in seen and kept == []
    _trainer_step(base, feats, tok, tmp_path / "m")
    assert kept and all("attention" in op for op in kept)


def test_attention_without_bounds_is_an_error():
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="seq_bounds"):
        varlen_attention.attention(None, x, x, x, None)


def test_collator_hands_over_every_sequences_bounds():
    """One row for the micro-batch (longest first), the pad tail to a multiple of 8 a sequence of its own."""
    coll = collate.PackCollator(0, bounds=True)
    batch = coll([{"input_ids": [1] * n, "labels": [1] * n} for n in [6, 4, 3, 12, 5, 2]])
    assert batch["input_ids"].shape == (1, 32)
    assert batch["seq_bounds"].tolist() == [0, 12, 18, 23, 27, 30, 32] and batch["seq_max"] == 12
    batch = coll([{"input_ids": [1] * n, "labels": [1] * n} for n in [6, 4, 3]])
    assert batch["input_ids"].shape == (1, 16)
    assert batch["seq_bounds"].tolist() == [0, 6, 10, 13, 16] and batch["seq_max"] == 6
    assert batch["position_ids"][0].tolist() == list(range(6)) + list(range(4)) + list(range(3)) + list(range(3))


def test_collator_pads_to_few_shapes_for_cuda_graphs():
    """cuda_graphs: the row padded to a multiple of GRAPH_MULTIPLE and seq_max the row's width, so a
    micro-batch's shapes take few values (a CUDA graph is recorded for each); the pad tail its own sequence."""
    coll = collate.PackCollator(0, bounds=True, graphs=True)
    m = collate.GRAPH_MULTIPLE
    batch = coll([{"input_ids": [1] * n, "labels": [1] * n} for n in [6, 4, 3]])
    assert batch["input_ids"].shape == (1, m) and batch["seq_max"] == m
    assert batch["seq_bounds"].tolist() == [0, 6, 10, 13, m]
    assert coll([{"input_ids": [1] * n, "labels": [1] * n} for n in [m, 1]])["input_ids"].shape == (1, 2 * m)


def test_collator_hands_over_the_answer_positions():
    """With the answer-only loss: the flat positions whose next label is an answer token (never a
    sequence's last position, whose next token is the next sequence's prompt)."""
    feats = [{"input_ids": [1] * 6, "labels": [-100] * 3 + [5] * 3}, {"input_ids": [1] * 4, "labels": [-100] * 2 + [7] * 2},
             {"input_ids": [1] * 3, "labels": [-100, 9, 9]}]
    batch = collate.PackCollator(0, bounds=True, answers=True)(feats)
    assert batch["answer_index"].tolist() == [2, 3, 4, 7, 8, 10, 11]
    assert "answer_index" not in collate.PackCollator(0, bounds=True)(feats)


def test_loss_by_answer_positions_is_the_masked_one(tiny):
    """token_nll gathering by the collator's flat positions gives the boolean mask's losses, bit for bit,
    in the same order."""
    model, _, tok = tiny
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)[0]
    batch = collate.PackCollator(tok.pad_token_id, bounds=True, answers=True)(feats)
    score = torch.zeros_like(batch["labels"], dtype=torch.bool)
    score[:, :-1] = batch["labels"][:, 1:] != collate.IGNORE
    with torch.no_grad():
        masked, rows = evaluate.token_nll(model, batch["input_ids"], None, score, batch["position_ids"])
        indexed, none = evaluate.token_nll(model, batch["input_ids"], None, None, batch["position_ids"],
                                           index=batch["answer_index"])
    assert torch.equal(indexed, masked) and none is None and len(rows) == len(masked) > 0


def _packed_sums(model, feats, **kw):
    coll = collate.PackCollator(0, bounds=True)
    batch = coll(feats)
    score = torch.zeros_like(batch["labels"], dtype=torch.bool)
    score[:, :-1] = batch["labels"][:, 1:] != collate.IGNORE
    bounds = dict(seq_bounds=batch["seq_bounds"], seq_max=batch["seq_max"]) | kw
    with torch.no_grad(), varlen_attention.training(model, True):
        losses, _ = evaluate.token_nll(model, batch["input_ids"], None, score, batch["position_ids"], **bounds)
    order = [i for r in coll.rows([len(f["input_ids"]) for f in feats]) for i in r]
    sizes = [sum(x != collate.IGNORE for x in feats[i]["labels"]) for i in order]
    sums = dict(zip(order, [c.sum().item() for c in losses.split(sizes)]))
    return [sums[i] for i in range(len(feats))]


def _tiny_gemma3(tmp_path):
    """A two-layer Gemma 3 (a sliding-window layer with a window of 16, shorter than every sample record,
    and a global one; its own attention scale), with the tiny model's tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = models.load_tokenizer(TINY)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_packed_row_keeps_every_examples_loss(tmp_path, arch):
    """The whole micro-batch in one row: each example's summed NLL equals its value alone (the metric's
    padded batches). Wrong bounds (two sequences merged) change it: the test can fail."""
    path = TINY if arch == "llama" else _tiny_gemma3(tmp_path)
    model, tok = models.load_model(path, "none"), models.load_tokenizer(path)
    recs = data.load_split("data/sample", "train", limit=5)
    feats, _, _ = collate.encode_examples(tok, recs, "course", 2048)
    ref = evaluate.perplexities(model, tok, [prompts.build(r["instruction"]) for r in recs],
                                [r["output"] for r in recs], progress=False)
    assert _packed_sums(model, feats) == pytest.approx(ref.nll, rel=1e-5)
    cu = collate.PackCollator(0, bounds=True)(feats)["seq_bounds"]
    merged = torch.cat([cu[:1], cu[2:]])
    assert _packed_sums(model, feats, seq_bounds=merged) != pytest.approx(ref.nll, rel=1e-4)
    assert model.config._attn_implementation == "sdpa"  # switched back after the block


def _trainer_step(p, feats, tok, tmp_path):
    """One real training step (the Trainer's training_step: forward and backward) on a LoRA model whose B
    is random (so every A has a gradient); the loss and the LoRA gradients."""
    torch.manual_seed(0)
    model = trainable.make_trainable(models.load_model(TINY, p.quantization, p.compute_dtype), p)
    g = torch.Generator().manual_seed(1)
    for name, w in model.named_parameters():
        if "lora_B" in name:
            w.data.copy_(torch.randn(w.shape, generator=g) * 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(model, tok, feats, [], p, tmp_path, collate.collator(p, tok))
    slow = p.varlen_attention and (not torch.cuda.is_available() or p.compute_dtype == "float32")
    assert any("flash kernel" in str(w.message) for w in caught) == slow  # the CPU/fp32 path says it is slow
    batch = collate.collator(p, tok)(feats)
    answers = (batch["labels"][:, 1:] != collate.IGNORE).sum()  # what the Trainer counts for the step's mean
    loss = trainer.training_step(model.train(), batch, num_items_in_batch=answers)
    return loss.item(), {n: w.grad.clone() for n, w in model.named_parameters() if w.requires_grad}


def varlen_same_step(base, tok, tmp_path, kernel="_masked", rel=1e-5, rtol=1e-4, atol=1e-5):
    """The Trainer's step on 4 sample records with masked packing (base) and with varlen_attention: the
    same loss (to rel) and LoRA gradients (to rtol, and atol of each gradient's largest entry). Returns how
    often varlen_attention's `kernel` (_masked, _flash) ran, the masked step's gradients and the records."""
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)[0]
    loss0, g0 = _trainer_step(base, feats, tok, tmp_path / "a")
    calls, run = [], getattr(varlen_attention, kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(varlen_attention, kernel, lambda *a: calls.append(1) or run(*a))
        loss, g = _trainer_step(dataclasses.replace(base, varlen_attention=True), feats, tok, tmp_path / "b")
    assert loss == pytest.approx(loss0, rel=rel)
    assert g.keys() == g0.keys() and all(g0[k].abs().sum() > 0 for k in g0)  # every A and B has a gradient
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=rtol, atol=atol * g0[k].abs().max().item())
    return len(calls), g0, feats


@pytest.mark.parametrize("speed", [{}, {"compile": True},
                                   {"compile": True, "compiled_recompute": 2, "cpp_wrapper": True}])
def test_training_step_equals_the_masked_one(tiny, tmp_path, speed):
    """The Trainer's step with varlen_attention gives the loss and LoRA gradients of packing under SDPA's
    mask, with checkpointed layers (their backward recomputes the forward, which must attend the same
    way), compiled or not, the recompute inside the compiled code too. Run without the switch around the
    backward, the recompute attends across the sequences and the gradients differ: the test can fail."""
    tok = tiny[2]
    base = params.TrainParams(model=TINY, quantization="none", compute_dtype="float32", packing=True,
                              gradient_checkpointing=True, eval_steps=1000, save_steps=0, **speed)
    calls, g0, feats = varlen_same_step(base, tok, tmp_path)
    if speed:  # traced, not called, once compiled
        return
    assert calls == 4  # each of the 2 layers: its forward and its recompute in backward
    with pytest.MonkeyPatch.context() as mp:  # the switch left before the backward
        mp.setattr(varlen_attention, "training", _forward_only_switch)
        _, bad = _trainer_step(dataclasses.replace(base, varlen_attention=True), feats, tok, tmp_path / "c")
    assert max((bad[k] - g0[k]).abs().max() / g0[k].abs().max() for k in g0) > 1e-3


def test_training_step_with_the_models_own_loss(tiny, tmp_path):
    """answer_loss: false (the model's own loss over full logits): the bounds reach the attention through
    the model's forward as well, and the step is the masked one."""
    base = params.TrainParams(model=TINY, quantization="none", compute_dtype="float32", packing=True,
                              answer_loss=False, eval_steps=1000, save_steps=0)
    assert varlen_same_step(base, tiny[2], tmp_path)[0] == 4


@contextlib.contextmanager
def _forward_only_switch(model, on):
    """A wrong switch: NAME for the forward only (the answer loss's call), SDPA again for the backward."""
    cfg = varlen_attention.config_of(model)
    loss_call = evaluate.token_nll

    def forward_only(*a, **kw):
        cfg._attn_implementation = varlen_attention.NAME
        try:
            return loss_call(*a, **kw)
        finally:
            cfg._attn_implementation = "sdpa"

    evaluate.token_nll = forward_only
    try:
        yield
    finally:
        evaluate.token_nll = loss_call


def test_cuda_graphs_step_is_the_varlen_one(tiny, tmp_path):
    """cuda_graphs: the whole decoder compiled as one graph (on CPU torch compiles without the CUDA graphs)
    and the row padded: the Trainer's step has the loss and LoRA gradients of the plain varlen step, and the
    decoder ran its compiled code (the CUDA graphs themselves: tests/test_gpu.py)."""
    base = params.TrainParams(model=TINY, quantization="none", compute_dtype="float32", packing=True,
                              varlen_attention=True, gradient_checkpointing=False, eval_steps=1000, save_steps=0)
    feats = collate.encode_examples(tiny[2], data.load_split("data/sample", "train", limit=4), "course", 2048)[0]
    loss0, g0 = _trainer_step(base, feats, tiny[2], tmp_path / "a")
    calls = []
    compile_decoder = speedups.compile_decoder

    def counted(model):
        compile_decoder(model)
        dec = speedups._decoder(model)
        run = dec._compiled_call_impl
        dec._compiled_call_impl = lambda *a, **kw: calls.append(1) or run(*a, **kw)

    # torch's config restored by its own patch (pytest's monkeypatch deletes what it did not find in __dict__)
    with pytest.MonkeyPatch.context() as mp, torch._dynamo.config.patch(specialize_float=False):
        mp.setattr(speedups, "compile_decoder", counted)
        p = dataclasses.replace(base, compile=True, cuda_graphs=True)
        loss, g = _trainer_step(p, feats, tiny[2], tmp_path / "b")
    assert calls and collate.collator(p, tiny[2])(feats)["input_ids"].shape[1] % collate.GRAPH_MULTIPLE == 0
    assert loss == pytest.approx(loss0, rel=1e-5)
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-4, atol=1e-5 * g0[k].abs().max().item())


def _graphs_trainer(tok, out, **kw):
    """A Trainer of the tiny model with cuda_graphs (the whole decoder compiled; on CPU without the graphs),
    the model and one packed micro-batch of 4 sample records."""
    p = params.TrainParams(model=TINY, quantization="none", compute_dtype="float32", packing=True, compile=True,
                           cuda_graphs=True, varlen_attention=True, gradient_checkpointing=False, eval_steps=1000,
                           save_steps=0, **kw)
    feats = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=4), "course", 2048)[0]
    model = trainable.make_trainable(models.load_model(TINY, "none", "float32"), p)
    t = make_trainer(model, tok, feats, [], p, out, collate.collator(p, tok))
    return t, model, collate.collator(p, tok)(feats)


def test_cuda_graphs_take_each_steps_gradients_at_its_first_micro_batch(tiny, tmp_path, monkeypatch):
    """cuda_graphs: a step's first micro-batch has its gradients copied out of the graphs' memory into the
    flat buffers (the next replay writes there; tests/test_gpu.py shows it matters), later ones add into
    them; the Trainer's zero_grad (HF calls it after each step) drops them, its clip is torch's on the
    buffers. On a CPU the Trainer says that cuda_graphs only compiles there."""
    from lib.graph_grads import GraphGrads

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, model, batch = _graphs_trainer(tiny[2], tmp_path, grad_accum=2)
    assert any("cuda_graphs replays CUDA graphs on a GPU only" in str(w.message) for w in caught)  # CPU here
    calls = {"take": 0}
    monkeypatch.setattr(GraphGrads, "take", _counted(GraphGrads.take, calls, "take"))
    trained = [w for w in model.parameters() if w.requires_grad]
    seen = []
    with torch._dynamo.config.patch(specialize_float=False):  # compile_decoder's setting, undone after
        for step_ends in (False, True, False):
            before = calls["take"]
            t.training_step(model.train(), dict(batch), num_items_in_batch=torch.tensor(100))
            seen.append(calls["take"] > before)
            if step_ends:
                grads = [w.grad.clone() for w in trained]
                expected = torch.nn.utils.clip_grad_norm_(trained, 0.3)  # clips these weights' gradients
                for w, g in zip(trained, grads):
                    w.grad.copy_(g)
                norm = t._clip_grad_norm(model)  # HF's hook, as its loop calls it
                torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
                model.zero_grad()
                assert all(w.grad is None for w in trained)
    assert seen == [True, False, True]  # the second adds into the buffers; the third is the next step's first
    assert "zero_grad" in vars(model)  # only the trained weights' walk
    assert {w.grad.untyped_storage().data_ptr() for w in trained} == {t.graph_grads.flats[0].data_ptr()}


def test_cuda_graphs_hf_loop_clips_and_zeroes_through_the_buffers(tiny, tmp_path, monkeypatch):
    """HF's own loop (Trainer.train) reaches GraphGrads: a take, a clip and a zero_grad per step (a
    transformers that renamed _clip_grad_norm would clip the long way round, silently)."""
    from lib.graph_grads import GraphGrads

    counts = {"take": 0, "clip": 0, "zero_grad": 0}
    for name in counts:
        monkeypatch.setattr(GraphGrads, name, _counted(getattr(GraphGrads, name), counts, name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuda_graphs on a CPU (asserted above)
        t, model, _ = _graphs_trainer(tiny[2], tmp_path, grad_accum=2, max_steps=3)
        t.remove_callback(CurveCallback)  # no evaluation records here
        with torch._dynamo.config.patch(specialize_float=False):  # compile_decoder's setting, undone after
            t.train()
    assert counts == {"take": 3, "clip": 3, "zero_grad": 3}


def test_flat_params_train_as_the_weights_one_by_one(tiny, tmp_path):
    """flat_params: three optimizer steps over one flat parameter give the weights that AdamW over each LoRA
    weight gives (cuda_graphs both, so the same gradients); the weights are views of the optimizer's one
    parameter, and the adapter saves (safetensors refuses shared memory: peft copies) as they are."""
    from safetensors.torch import load_file

    def trained(flat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cuda_graphs on a CPU (asserted above)
            torch.manual_seed(0)
            t, model, _ = _graphs_trainer(tiny[2], tmp_path / str(flat), grad_accum=2, max_steps=3, flat_params=flat,
                                          learning_rate=1e-2)
            t.remove_callback(CurveCallback)  # no evaluation records here
            before = {n: w.detach().clone() for n, w in model.named_parameters() if w.requires_grad}
            with torch._dynamo.config.patch(specialize_float=False):  # compile_decoder's setting, undone after
                t.train()
        return t, model, before

    t0, m0, before = trained(False)
    t1, m1, _ = trained(True)
    after = {n: w for n, w in m1.named_parameters() if w.requires_grad}
    for n, w in m0.named_parameters():
        if w.requires_grad:
            torch.testing.assert_close(after[n], w, rtol=1e-6, atol=1e-8)
    assert max((w - before[n]).abs().max().item() for n, w in after.items()) > 1e-3  # they trained
    (flat,) = [p for g in t1.optimizer.param_groups for p in g["params"]]
    assert flat.numel() == sum(w.numel() for w in after.values())
    assert {w.untyped_storage().data_ptr() for w in after.values()} == {flat.untyped_storage().data_ptr()}
    m1.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(after) and all(torch.equal(saved[k], after[k.replace(".weight", ".default.weight")])
                                            for k in saved)


def test_flat_params_refused_with_a_decay_some_weights_skip(tiny, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, _, _ = _graphs_trainer(tiny[2], tmp_path, flat_params=True, weight_decay=0.1, full_finetune=True)
    with pytest.raises(ValueError, match="flat_params steps every trained weight with one weight decay"):
        t.create_optimizer()


def _counted(f, counts, name):
    def counted(*a, **k):
        counts[name] += 1
        return f(*a, **k)
    return counted


def test_cuda_graphs_under_ddp_sum_gradients_in_one_flat_all_reduce(tiny, tmp_path, monkeypatch):
    """cuda_graphs under DDP: DDP's hooks stay idle and the Trainer all-reduces the gradients itself, once, in
    one flat buffer, at the step's last micro-batch only. In a 1-process gloo group the mean is the process's
    own gradients: equal to the unwrapped model's step (tests/test_launch.py checks 2 processes' sums)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuda_graphs on a CPU (asserted above)
        t, model, batch = _graphs_trainer(tiny[2], tmp_path)
    trained = [w for w in model.parameters() if w.requires_grad]

    def step(m, sync=True):
        t.accelerator.gradient_state._set_sync_gradients(sync)  # as HF's loop sets it before each micro-batch
        model.zero_grad(set_to_none=True)
        t.training_step(m.train(), dict(batch), num_items_in_batch=torch.tensor(100))
        return [w.grad.clone() for w in trained]

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch._dynamo.config.patch(specialize_float=False):  # compile_decoder's setting, undone after
            plain = step(model)
            wrapped = DistributedDataParallel(model)
            reduces, reduce = [], dist.all_reduce
            monkeypatch.setattr(dist, "all_reduce", lambda x, *a, **k: reduces.append(x.numel()) or reduce(x, *a, **k))
            step(wrapped, sync=False)  # a micro-batch before the step's last: no sums yet
            assert reduces == []
            grads = step(wrapped)
    finally:
        dist.destroy_process_group()
    assert reduces == [sum(w.numel() for w in trained)]  # one all-reduce of every trained weight's gradient
    assert len({w.grad.untyped_storage().data_ptr() for w in trained}) == 1  # views of one buffer
    for a, b in zip(plain, grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw, match", [
    (dict(compile=True, cuda_graphs=True, packing=True), "needs varlen_attention"),
    (dict(compile=True, cuda_graphs=True, packing=True, varlen_attention=True, gradient_checkpointing=False,
          ddp_bf16_grads=True), "ddp_bf16_grads"),
    (dict(compile=True, cuda_graphs=True, packing=True, varlen_attention=True), "gradient_checkpointing: false"),
    (dict(compile=True, cuda_graphs=True, packing=True, varlen_attention=True, gradient_checkpointing=False,
          cpp_wrapper=True), "leave compile_mode"),
    (dict(cuda_graphs=True, packing=True, varlen_attention=True, gradient_checkpointing=False), "needs compile"),
    (dict(varlen_attention=True), "needs packing: true"),
    (dict(varlen_attention=True, packing=True, pack_tokens=1024), "leave pack_tokens out"),
])
def test_varlen_params_refused(kw, match):
    with pytest.raises(params.ParamsError, match=match):
        params.TrainParams(**kw).check()


def test_flash_path_is_chosen_only_where_it_runs():
    """CPU or fp32: the masked path (the flash kernel takes CUDA half precision only)."""
    assert not varlen_attention._flash_ok(torch.zeros(4, 2, 8, dtype=torch.bfloat16))
