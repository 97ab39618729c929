import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lib import collate, data, evaluate, finetune, params, prompts
from lib.trainer import answer_loss
from tests.tiny_model import TINY

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(**kw):
    base = dict(model=TINY, micro_batch_size=4, grad_accum=1, max_steps=6, eval_steps=2,
                save_steps=2, logging_steps=1, eval_limit=6, learning_rate=1e-2)
    return params.FinetuneParams(**{**base, **kw})


def test_labels_mask_matches_evaluator(tiny):
    """Training labels score exactly the tokens the course metric scores, token by token."""
    _, _, tok = tiny
    recs = data.load_split("data/sample", "train", limit=8)
    feats, cut, _ = collate.encode_examples(tok, recs, "course", 2048)
    assert cut == 0
    for r, f in zip(recs, feats):
        e = evaluate.encode(tok, prompts.build(r["instruction"]), r["output"], 2048)
        assert f["input_ids"] == e.input_ids
        scored = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != collate.IGNORE]
        assert scored == e.input_ids[e.n_prompt:]
        assert scored[-1] == tok.eos_token_id
        assert tok.decode(scored[:-1]) == r["output"]


def test_collator_pads_right_and_masks():
    batch = collate.PadCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                  {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_qlora_trains_and_loss_falls(tmp_path):
    """Through the real 4-bit path on CPU: LoRA only is trainable, the loss and eval ppl fall."""
    p = tiny_params(max_steps=8, eval_steps=4, save_steps=4)
    tr = data.load_split(p.data_dir, "train")
    ev = data.load_split(p.data_dir, "public_test", limit=6)
    r = finetune.finetune(p, tr, ev, tmp_path)
    model, curve, s = r.model, r.curve, r.summary
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    assert all("lora_" in n for n, x in model.named_parameters() if x.requires_grad)
    assert 0 < s["trainable_params"] < s["total_params"]
    assert curve.step.tolist() == [0, 4, 8]
    assert curve.eval_ppl.iloc[-1] < 0.95 * curve.eval_ppl.iloc[0]
    losses = curve.train_loss.dropna()
    assert losses.iloc[-1] < losses.iloc[0]
    assert s["best_step"] == 8 and (tmp_path / "best_adapter" / "adapter_config.json").exists()
    assert sorted(x.name for x in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    steps = json.loads((tmp_path / "step_seconds.json").read_text())  # each optimizer step's seconds
    assert len(steps) == 8 and float(np.median(steps)) == pytest.approx(s["median_s_per_step"], abs=2e-4)


def test_save_steps_zero_writes_no_checkpoint(tmp_path):
    """HF saves a checkpoint at the last step whatever save_steps is (a full-FT one is ~21 GB: two runs
    side by side filled a 64-GiB disk); save_steps 0 writes none, and the run still ends with its adapter."""
    tr, ev = data.load_split("data/sample", "train"), data.load_split("data/sample", "public_test", limit=4)
    big = finetune.finetune(tiny_params(max_steps=4, eval_steps=2, save_steps=100), tr, ev, tmp_path / "big")
    assert [x.name for x in (tmp_path / "big" / "checkpoints").iterdir()] == ["checkpoint-4"]
    none = finetune.finetune(tiny_params(max_steps=4, eval_steps=2, save_steps=0), tr, ev, tmp_path / "none")
    assert not list((tmp_path / "none").glob("checkpoints/checkpoint-*"))
    assert (tmp_path / "none" / "final_adapter" / "adapter_config.json").exists() and none.summary["steps"] == 4
    assert none.curve.eval_ppl.tolist() == pytest.approx(big.curve.eval_ppl.tolist(), rel=1e-6)  # same run otherwise


def test_bad_inputs_fail_before_training():
    p = tiny_params(eval_steps=100)
    ev = data.load_split("data/sample", "public_test", limit=2)
    with pytest.raises(ValueError, match="eval_steps=100 is larger than the run"):
        finetune.check_inputs(p, data.load_split("data/sample", "train"), ev)
    with pytest.raises(ValueError, match="training set is empty"):
        finetune.check_inputs(tiny_params(), [], ev)
    priv = data.load_split("data/sample", "private_test", limit=2)
    with pytest.raises(ValueError, match="without 'output'"):
        finetune.check_inputs(tiny_params(), ev, priv)


def _run(cfg: Path, out: Path, kill_after_step=None):
    cmd = [sys.executable, "-u", "-m", "lib.train", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if kill_after_step is not None and f"step {kill_after_step}: eval" in line:
            proc.send_signal(signal.SIGKILL)  # a crash, not a polite stop
            break
    return proc.wait()


def _cfg(tmp_path, **train) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"common": {"model": TINY, "eval_limit": 6}, "train": {
        "micro_batch_size": 4, "grad_accum": 2, "eval_steps": 2, "logging_steps": 1, "learning_rate": 0.01, **train}}))
    return cfg


# flat_params: the optimizer's state is the flat parameter's, and the resumed run's weights are rebound into it
FLAT = dict(quantization="none", packing=True, varlen_attention=True, compile=True, cuda_graphs=True,
            gradient_checkpointing=False, flat_params=True)


@pytest.mark.parametrize("recipe", [{}, {"balance_ranks": True}, FLAT], ids=["random", "balance_ranks", "flat_params"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, recipe):
    """Killed, then resumed from its last checkpoint: the same curve to the bit, over 3 epochs of the sample
    (reshuffled each), with HF's random order or lib.sampler's token-balanced one, and with the optimizer
    over one flat parameter (flat_params)."""
    cfg = _cfg(tmp_path, max_steps=16, save_steps=2, **recipe)
    assert _run(cfg, tmp_path / "full") == 0
    assert _run(cfg, tmp_path / "cut", kill_after_step=6) == -signal.SIGKILL
    done = [int(c.name.split("-")[1]) for c in (tmp_path / "cut" / "checkpoints").iterdir()]
    assert 4 <= max(done) < 16, done  # really killed mid-way
    assert _run(cfg, tmp_path / "cut") == 0  # resumes from the last checkpoint
    full = pd.read_csv(tmp_path / "full" / "curve.csv")
    cut = pd.read_csv(tmp_path / "cut" / "curve.csv")
    assert full.step.tolist() == cut.step.tolist() == list(range(0, 17, 2))
    # bit-exact (it drifted by 3e-4 at step 16 while 4-bit weights were repacked for bitsandbytes' CPU
    # kernel after an evaluation: lib.models.no_cpu_repack)
    assert cut.eval_ppl.tolist() == full.eval_ppl.tolist()
    assert cut.train_loss.iloc[1:].tolist() == full.train_loss.iloc[1:].tolist()


def _lora_grads(model, batch):
    model.zero_grad()
    answer_loss(model, **batch).backward()
    return {n: x.grad.clone() for n, x in model.named_parameters() if x.grad is not None}


def test_an_evaluation_leaves_the_training_gradients_as_they_were():
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at an eval-mode forward, and that
    kernel has no backward: without lib.models.no_cpu_repack the gradient through the frozen weights
    is dropped after the first learning-curve evaluation (on CPUs with AVX512-BF16, as CI's; elsewhere the
    kernel never runs and this holds either way)."""
    from lib import trainable

    model, tok = trainable.build(tiny_params(lora_r=8))
    model.train()
    feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=3), "course", 2048)
    batch = collate.PadCollator(tok.pad_token_id)(feats)
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():  # what the learning-curve callback does between optimizer steps
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    after = _lora_grads(model, batch)
    first = [n for n in before if "layers.0." in n and "lora_B" in n]  # B: A's gradient is 0 at init (B = 0)
    assert first and all(before[n].abs().sum() > 0 for n in first)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_checkpointed_layers_recompute_only_the_first_n():
    """checkpointed_layers: 1 of the tiny model's 2 layers: in a training step layer 0 runs its forward
    twice (again in backward), layer 1 once; the LoRA gradients are those of checkpointing both and of
    checkpointing none (recomputing changes when, not what)."""
    from lib import speedups, trainable

    feats = None
    runs = {}
    for ck, n in [(True, 0), (True, 1), (False, 0)]:
        model, tok = trainable.build(tiny_params(lora_r=8, gradient_checkpointing=ck, checkpointed_layers=n))
        model.train()
        if feats is None:
            feats, _, _ = collate.encode_examples(tok, data.load_split("data/sample", "train", limit=3), "course", 2048)
        calls = [0, 0]
        for i, layer in enumerate(speedups.decoder_layers(model)):
            layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        runs[(ck, n)] = (_lora_grads(model, collate.PadCollator(tok.pad_token_id)(feats)), calls)
    assert [runs[k][1] for k in [(True, 0), (True, 1), (False, 0)]] == [[2, 2], [2, 1], [1, 1]]
    full, part, none = (runs[k][0] for k in [(True, 0), (True, 1), (False, 0)])
    assert full and all(torch.allclose(part[k], full[k], atol=1e-7) and torch.allclose(none[k], full[k], atol=1e-7)
                        for k in full)
    with pytest.raises(params.ParamsError, match="needs gradient_checkpointing"):
        tiny_params(gradient_checkpointing=False, checkpointed_layers=1)
    with pytest.raises(ValueError, match="more than the model's 2 decoder layers"):
        trainable.build(tiny_params(checkpointed_layers=3))


def test_answer_loss_equals_model_loss(tiny):
    """The answer-only LM head gives the model's own loss on the same labels (to float precision)."""
    model, _, tok = tiny
    recs = data.load_split("data/sample", "train", limit=5)
    feats, _, _ = collate.encode_examples(tok, recs, "course", 2048)
    batch = collate.PadCollator(tok.pad_token_id)(feats)
    with torch.no_grad():
        hf = model(**batch).loss
        ours = answer_loss(model, **batch)
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)


@pytest.mark.parametrize("row_tokens", [10 ** 6, 300])
def test_packing_keeps_every_examples_loss(tiny, row_tokens):
    """Padding-free packing (one row, or several padded rows): each example's summed NLL equals its
    unpacked value (block-diagonal mask from the restarting positions)."""
    model, _, tok = tiny
    recs = data.load_split("data/sample", "train", limit=6)
    feats, _, _ = collate.encode_examples(tok, recs, "course", 2048)
    coll = collate.PackCollator(tok.pad_token_id, row_tokens)
    packed = coll(feats)
    rows = coll.rows([len(f["input_ids"]) for f in feats])
    order = [i for r in rows for i in r]
    assert sorted(order) == list(range(len(feats)))
    assert len(rows) == (1 if row_tokens > 10 ** 5 else 3)  # 300: two of the sample's 111-125-token records a row
    assert packed["input_ids"].shape[0] == len(rows)
    assert (packed["labels"] != collate.IGNORE).sum() == sum(sum(x != collate.IGNORE for x in f["labels"]) for f in feats)
    score = torch.zeros_like(packed["labels"], dtype=torch.bool)
    score[:, :-1] = packed["labels"][:, 1:] != collate.IGNORE
    with torch.no_grad():
        losses, _ = evaluate.token_nll(model, packed["input_ids"], None, score, packed["position_ids"])
    sizes = [sum(x != collate.IGNORE for x in feats[i]["labels"]) for i in order]
    per_example = dict(zip(order, [chunk.sum().item() for chunk in losses.split(sizes)]))
    ref = evaluate.perplexities(model, tok, [prompts.build(r["instruction"]) for r in recs],
                                [r["output"] for r in recs], progress=False)
    assert [per_example[i] for i in range(len(feats))] == pytest.approx(ref.nll, rel=1e-5)
    # and without the restarted positions the examples would see each other: the test can fail
    with torch.no_grad():
        leaky, _ = evaluate.token_nll(model, packed["input_ids"], None, score, None)
    leaky_sums = dict(zip(order, [chunk.sum().item() for chunk in leaky.split(sizes)]))
    assert max(abs(leaky_sums[i] - ref.nll[i]) / ref.nll[i] for i in range(len(feats))) > 1e-4  # 1.7e-3 when seen


def test_pack_rows_first_fit():
    coll = collate.PackCollator(0, row_tokens=10)
    rows = coll.rows([6, 4, 3, 12, 5, 2])
    assert rows == [[3], [0, 1], [4, 2, 5]]  # longest first, each into the first row with room; 12 alone
    batch = coll([{"input_ids": [1] * n, "labels": [1] * n} for n in [6, 4, 3, 12, 5, 2]])
    assert batch["input_ids"].shape == (3, 16)  # the longest row, 12, rounded up to a multiple of 8
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3] + list(range(6))
    assert batch["labels"][2].tolist() == [1] * 10 + [collate.IGNORE] * 6


def test_lean_nf4_run_equals_the_seed_path_and_its_adapter_loads_on_bitsandbytes(tmp_path):
    """A whole run with lean_nf4 gives the very same learning curve, and its saved adapter scores the
    same on a freshly loaded bitsandbytes model (adapters stay portable)."""
    from dataclasses import replace

    import bitsandbytes as bnb
    from peft import PeftModel

    from lib import models

    p0 = tiny_params(max_steps=4, eval_steps=2, save_steps=4, keep_frozen_dtype=True, packing=True)
    tr = data.load_split(p0.data_dir, "train")
    ev = data.load_split(p0.data_dir, "public_test", limit=6)
    seed = finetune.finetune(p0, tr, ev, tmp_path / "seed").curve
    r = finetune.finetune(replace(p0, lean_nf4=True), tr, ev, tmp_path / "lean")
    model, tok, lean, s = r.model, r.tok, r.curve, r.summary
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # the same dequantize-and-matmul as bitsandbytes' (no CPU repacking: lib.models.no_cpu_repack)
    assert lean.eval_ppl.to_numpy() == pytest.approx(seed.eval_ppl.to_numpy(), rel=1e-6)
    assert lean.eval_ppl.iloc[-1] < lean.eval_ppl.iloc[0]
    plain = PeftModel.from_pretrained(models.load_model(p0.model, "nf4", p0.compute_dtype, "cpu"),
                                      tmp_path / "lean" / "best_adapter")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    df = evaluate.score_records(plain, tok, ev, [prompts.build(r["instruction"]) for r in ev], 4, p0.max_length)
    assert df.ppl.mean() == pytest.approx(s["best_ppl"], rel=1e-6)


def test_dora_starts_as_the_base_model_trains_and_its_adapter_reloads(tmp_path):
    """use_dora: at step 0 the model is the base model (the same evaluation as plain LoRA, whose B is 0),
    training lowers the curve, and the saved adapter (a DoRA one) scores its best evaluation again on a
    freshly loaded base. It excludes the layers that replace peft's 4-bit ones."""
    from dataclasses import replace

    from lib import trainable

    p0 = tiny_params(max_steps=4, eval_steps=2, save_steps=4, quantization="none")
    tr = data.load_split(p0.data_dir, "train")
    ev = data.load_split(p0.data_dir, "public_test", limit=6)
    lora = finetune.finetune(p0, tr, ev, tmp_path / "lora").curve
    r = finetune.finetune(replace(p0, use_dora=True), tr, ev, tmp_path / "dora")
    assert any("lora_magnitude_vector" in n for n, _ in r.model.named_parameters())
    assert r.curve.eval_ppl.iloc[0] == pytest.approx(lora.eval_ppl.iloc[0], rel=1e-6)
    assert r.curve.eval_ppl.iloc[-1] < r.curve.eval_ppl.iloc[0]
    assert r.curve.eval_ppl.iloc[-1] != pytest.approx(lora.eval_ppl.iloc[-1], rel=1e-4)  # another method
    model, tok = trainable.load_adapted(replace(p0, use_dora=True), tmp_path / "dora" / "best_adapter")
    df = evaluate.score_records(model, tok, ev, [prompts.build(x["instruction"]) for x in ev], 4, p0.max_length)
    assert df.ppl.mean() == pytest.approx(r.summary["best_ppl"], rel=1e-6)
    with pytest.raises(params.ParamsError, match="use_dora and lean_nf4 exclude each other"):
        tiny_params(use_dora=True, lean_nf4=True)


def test_full_finetune_trains_every_weight_and_its_model_reloads(tmp_path):
    """full_finetune: every weight trains (none frozen, no adapter); step 0 and the first training loss
    are plain LoRA's (both start as the base model on the same batch); the curve falls; the saved best
    model scores its best evaluation again when loaded as a model of its own; 4-bit bases are refused."""
    from dataclasses import replace

    from lib import trainable

    p0 = tiny_params(max_steps=4, eval_steps=2, save_steps=4, quantization="none")
    tr = data.load_split(p0.data_dir, "train")
    ev = data.load_split(p0.data_dir, "public_test", limit=6)
    lora = finetune.finetune(p0, tr, ev, tmp_path / "lora").curve
    p = replace(p0, full_finetune=True, learning_rate=1e-3)
    r = finetune.finetune(p, tr, ev, tmp_path / "full")
    n, total = trainable.trainable_params(r.model)
    assert n == total and all(x.dtype == torch.float32 for x in r.model.parameters())
    assert not (tmp_path / "full" / "best_adapter" / "adapter_config.json").exists()
    assert r.curve.eval_ppl.iloc[0] == pytest.approx(lora.eval_ppl.iloc[0], rel=1e-6)
    assert r.curve.train_loss.dropna().iloc[0] == pytest.approx(lora.train_loss.dropna().iloc[0], rel=1e-5)
    assert r.curve.eval_ppl.iloc[-1] < r.curve.eval_ppl.iloc[0]
    model, tok = trainable.load_adapted(p, tmp_path / "full" / "best_adapter")
    df = evaluate.score_records(model, tok, ev, [prompts.build(x["instruction"]) for x in ev], 4, p.max_length)
    assert df.ppl.mean() == pytest.approx(r.summary["best_ppl"], rel=1e-6)
    assert params.method(p.quantization, p.full_finetune) == "full fine-tuning"
    with pytest.raises(params.ParamsError, match="full_finetune .* needs quantization: none"):
        tiny_params(full_finetune=True)  # the default quantization is nf4


# The learning curve of this run, recorded with the code before the restructuring (commit 21a97fa,
# `python -m lib.train`, CPU) and re-recorded once since, when 4-bit weights stopped being repacked for
# bitsandbytes' AVX512-BF16 CPU kernel in a model that trains (lib.models.no_cpu_repack): evaluations
# moved by up to 1.2e-4 relative (the other kernel), training losses by 5e-6. Any other change of a
# number is a change of behaviour.
BEFORE = {"eval_ppl": [692.9774130125473, 667.3575957936233, 604.5462874723848, 580.3088847028686, 578.5240923518546],
          "train_loss": [float("nan"), 6.529192924499512, 6.430240631103516, 6.346643447875977, 6.430446147918701]}


def test_learning_curve_unchanged(tmp_path):
    assert _run(_cfg(tmp_path, max_steps=8, save_steps=4), tmp_path / "run") == 0
    curve = pd.read_csv(tmp_path / "run" / "curve.csv")
    assert curve.step.tolist() == [0, 2, 4, 6, 8]
    assert curve.eval_ppl.to_numpy() == pytest.approx(BEFORE["eval_ppl"], rel=1e-6)
    assert curve.train_loss.to_numpy() == pytest.approx(BEFORE["train_loss"], rel=1e-6, nan_ok=True)


def test_one_process_trains_one_micro_batch_on_a_multi_gpu_host(tmp_path, monkeypatch):
    """HF's Trainer takes every visible GPU of a single process for nn.DataParallel and multiplies the
    micro-batch by their number; a run of one process keeps the recipe's micro-batch (2 GPUs faked)."""
    from lib.trainer import training_args

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = training_args(tiny_params(device="cuda"), tmp_path, 40)  # no CUDA here: HF's GPU branch on the CPU
    assert args.n_gpu == 1 and args.train_batch_size == 4


def test_step_times_leave_evaluations_out(tmp_path):
    """median_s_per_step's samples: each optimizer step's time from the end of the one before (what the
    Trainer does before the step begins counts: fetching the batch, a logged loss's wait), the evaluation
    after it and a checkpoint's save not counted."""
    import time
    from types import SimpleNamespace

    from lib.trainer import CurveCallback

    cb = CurveCallback(None, [], tiny_params(eval_steps=1), tmp_path)
    cb._evaluate = lambda model, state: time.sleep(0.3)  # a slow evaluation at step 0 and after every step
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    for step in (1, 2, 3):
        if step == 2:
            time.sleep(0.3)
            cb.on_save(None, None, None)  # a checkpoint's save after step 1 is not step 2's time
        time.sleep(0.05)  # the Trainer fetches and copies the step's batches before the step begins
        cb.on_step_begin(None, None, None)
        time.sleep(0.02)  # the step
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=3), None)
    assert len(cb.step_s) == 3 and all(0.07 <= s < 0.25 for s in cb.step_s)


def test_steady_step_is_the_mean_after_warm_up(tmp_path):
    """steady_s_per_step: the mean of the steps after the first ten (compilation), where a host that ran
    ahead waits at a sync; with ten steps or fewer, the mean of all; with none, None."""
    from lib.trainer import CurveCallback

    cb = CurveCallback(None, [], tiny_params(), tmp_path)
    assert cb.steady_s_per_step() is None
    cb.step_s = [5.0, 4.0] + [0.1] * 8 + [0.1, 0.1, 0.1, 1.3]  # a sync every fourth step absorbs the queue
    assert cb.steady_s_per_step() == pytest.approx((0.1 * 3 + 1.3) / 4)  # 0.4; the median of them is 0.1
    cb.step_s = [1.0, 2.0, 3.0]
    assert cb.steady_s_per_step() == pytest.approx(2.0)


def test_a_steps_fetch_is_timed_apart_from_its_work(tmp_path, monkeypatch):
    """per_process: the median fetch is what HF spends getting a step's micro-batches (a loader taking 0.05 s
    a batch, 2 a step: at least 0.1 s), the median step holds it and the step's own work (a 0.1-s pause
    before each optimizer step); one process, one entry."""
    import time

    from transformers import TrainerCallback

    def slow_collator(p, tok, real=collate.collator):
        inner = real(p, tok)
        return lambda features: time.sleep(0.05) or inner(features)

    class Work(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            time.sleep(0.1)

    def with_work(*args, real=finetune.make_trainer, **kw):
        trainer = real(*args, **kw)
        trainer.add_callback(Work())
        return trainer

    monkeypatch.setattr(finetune.collate, "collator", slow_collator)
    monkeypatch.setattr(finetune, "make_trainer", with_work)
    tr, ev = data.load_split("data/sample", "train", limit=16), data.load_split("data/sample", "public_test", limit=4)
    s = finetune.finetune(tiny_params(micro_batch_size=2, grad_accum=2, max_steps=4, eval_steps=4, save_steps=0),
                          tr, ev, tmp_path).summary
    [mine] = s["per_process"]
    fetch, step = mine["median_fetch_s"], mine["median_s_per_step"]
    assert step == s["median_s_per_step"]
    assert 0.1 <= fetch < 0.18  # two batches (three at the first step: accelerate's loader looks one ahead)
    assert step - fetch >= 0.1  # the work is the step's, not the fetch's


def test_neftune_reaches_the_trainer_and_noises_only_training(tiny, tmp_path):
    """NEFTune is HF's own (noise on the input embeddings in training): the param reaches it, or is off."""
    from lib.trainer import training_args

    assert training_args(tiny_params(), tmp_path, 40).neftune_noise_alpha is None
    assert training_args(tiny_params(neftune_noise_alpha=5.0), tmp_path, 40).neftune_noise_alpha == 5.0
    with pytest.raises(params.ParamsError, match="neftune_noise_alpha"):
        tiny_params(neftune_noise_alpha=-1.0)


def test_the_effective_batch_defines_the_curve(tmp_path):
    """micro-batch 2 x grad-accum 4 and 8 x 1 train on the same 8 records a step: the same curve (the loss
    is a token mean over the whole step, not a mean of micro-batch means)."""
    tr = data.load_split("data/sample", "train", limit=32)
    ev = data.load_split("data/sample", "public_test", limit=6)
    curves = [finetune.finetune(tiny_params(micro_batch_size=m, grad_accum=g, max_steps=4, eval_steps=2, save_steps=4),
                                tr, ev, tmp_path / f"{m}x{g}").curve for m, g in ((2, 4), (8, 1))]
    assert curves[0].eval_ppl.to_numpy() == pytest.approx(curves[1].eval_ppl.to_numpy(), rel=1e-5)


@pytest.mark.parametrize("eval_steps,caught", [(4, "eval_ppl nan"), (8, "loss nan, grad_norm nan")])
def test_a_diverging_run_stops_with_the_step_and_keeps_its_checkpoints(tmp_path, monkeypatch, eval_steps, caught):
    """Weights turned NaN after step 3 (as cuDNN's attention did on an H100): the run stops at step 4 with
    a one-line error naming what went NaN (its evaluation, or without one the logged gradient norm),
    instead of training NaN to the end and saving it; the checkpoint before it and the best adapter stay;
    a finished run is not recorded."""
    from transformers import TrainerCallback

    from lib import cli, trainer

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                with torch.no_grad():
                    next(x for n, x in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    def with_poison(*a, **kw):
        t = trainer.make_trainer(*a, **kw)
        t.add_callback(Poison())
        return t

    monkeypatch.setattr(finetune, "make_trainer", with_poison)
    p = tiny_params(max_steps=8, eval_steps=eval_steps, save_steps=2)
    tr = data.load_split(p.data_dir, "train")
    ev = data.load_split(p.data_dir, "public_test", limit=6)
    with pytest.raises(trainer.TrainingDiverged, match=rf"^step 4: {caught}: training diverged"):
        finetune.finetune(p, tr, ev, tmp_path)
    import json
    import math

    state = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [r["loss"] for r in state["log_history"] if "loss" in r]
    assert state["global_step"] == 2 and len(losses) == 2 and all(map(math.isfinite, losses))  # resumable, sound
    from safetensors.torch import load_file

    best = load_file(tmp_path / "best_adapter" / "adapter_model.safetensors")  # from before the poison: sound
    assert best and all(torch.isfinite(t).all() for t in best.values())
    assert not (tmp_path / "summary.json").exists()
    assert issubclass(trainer.TrainingDiverged, cli.USER_ERRORS)  # one line in lib.train, not a traceback
