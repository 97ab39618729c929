"""One fine-tuning run, the entry point of 01, 04 and `python -m lib.train`.

finetune() decides by itself: a finished run of the same recipe and data is read back; p.num_processes
> 1 launches that many data-parallel processes (lib.launch), each of which comes back here and fits;
otherwise it fits in this process; p.soup_seeds > 1 does one of these per seed and averages the runs'
best models (lib/soup.py). Every way returns a FinetuneResult.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import collate, evaluate, launch, models, paramfile, prompts, results, reverse, runs, soup, speedups, trainable
from .embedded import EMBEDDED
from .models import device_for
from .trainer import curve_callback, curve_row, curve_table, make_trainer, per_process, planned_steps, world_size


@dataclass
class FinetuneResult:
    curve: pd.DataFrame  # the learning curve, one row per evaluation
    summary: dict
    out: Path  # the run folder: best_adapter/, final_adapter/, checkpoints/, curve.csv, summary.json
    model: object = field(default=None, repr=False)  # the trained model, when trained in this process
    tok: object = field(default=None, repr=False)

    def adapted(self, p, adapter="best_adapter"):
        """(model, tokenizer): the base model with one of this run's adapters, for predictions."""
        self.model = None  # the trained copy goes before a second one is loaded
        return trainable.load_adapted(p, self.out / adapter)


def check_inputs(p, train_records, eval_records):
    """Clear errors before any training starts."""
    if not train_records:
        raise ValueError("the training set is empty")
    if any("output" not in r for r in eval_records):
        raise ValueError(f"the eval set ({p.eval_split}) has records without 'output'; it cannot be scored")
    steps = planned_steps(p, len(train_records))
    if p.eval_steps > steps:
        raise ValueError(f"eval_steps={p.eval_steps} is larger than the run ({steps} optimizer steps)")


def finetune(p, train_records, eval_records, out: Path, also=()) -> FinetuneResult:
    """Fine-tune p.model with p's recipe into out (resuming there), or read a finished run back.

    also: other folders where a finished run of the same recipe and data may be (04 looks in 01's).
    """
    out = Path(out)
    if p.soup_seeds > 1:
        return _soup(p, train_records, eval_records, out)
    train_records = reverse.training_records(train_records, p.reverse_pairs, p.seed)
    run = runs.describe(p, train_records, eval_records)
    for folder in (out, *map(Path, also)):
        if p.resume and (summary := runs.finished(folder, run)):
            print(f"{p.model}: reusing the finished run in {folder} (same recipe and data)", flush=True)
            return _read_back(folder, summary, p.model)
    check_inputs(p, train_records, eval_records)
    runs.claim(out, run, p.resume)
    if p.num_processes > 1 and world_size() == 1:
        cfg = paramfile.dump_train(p, out / "params.yaml")
        launch.run(cfg, out, p.num_processes, cpu=device_for(p.device) == "cpu")
        return _read_back(out, json.loads((out / "summary.json").read_text()), p.model)
    return _fit(p, train_records, eval_records, out, run)


def _read_back(folder: Path, summary: dict, name: str) -> FinetuneResult:
    curve = pd.read_csv(folder / "curve.csv")
    return FinetuneResult(curve if "model" in curve else curve.assign(model=name), summary, folder)  # a soup names its runs


def _fit(p, train_records, eval_records, out: Path, run: dict) -> FinetuneResult:
    model, tok = trainable.build(p)
    feats, cut, skipped = collate.encode_examples(tok, train_records, p.template, p.max_length)
    if cut:
        print(f"note: {cut} of {len(feats)} training sequences are longer than max_length={p.max_length} and were cut")
    if skipped:
        print(f"note: {len(skipped)} training records leave no answer token within max_length={p.max_length} and "
              f"are skipped (first: {skipped[0]})")
    n_trainable, n_total = trainable.trainable_params(model)
    trainer = make_trainer(model, tok, feats, eval_records, p, out, collate.collator(p, tok))
    trainer.add_callback(runs.MarkComplete())
    last = runs.last_checkpoint(out) if p.resume else None
    if last:
        print(f"resuming from {last}", flush=True)
    t = time.time()
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    if p.compile:
        speedups.uncompile(model)
    curve = curve_table(trainer.state.log_history)
    best = curve.loc[curve.eval_ppl.idxmin()]
    steps = int(curve.step.max())
    ran = steps - (int(last.name.split("-")[-1]) if last else 0)  # this session's steps, for s/step
    runtime = trainer.state.log_history[-1].get("train_runtime", float("nan"))
    clock = curve_callback(trainer)  # its step times and the evaluations' seconds
    summary = {
        "model": p.model, "fingerprint": run["fingerprint"],
        "zero_shot_ppl": float(curve.eval_ppl.iloc[0]), "best_ppl": float(best.eval_ppl),
        "best_step": int(best.step), "final_ppl": float(curve.eval_ppl.iloc[-1]), "steps": steps,
        "zero_shot_bits_per_char": float(curve.eval_bits_per_char.iloc[0]),
        "best_bits_per_char": float(best.eval_bits_per_char),
        "trainable_params": n_trainable, "total_params": n_total,
        "nominal_params": EMBEDDED[p.model].params if p.model in EMBEDDED else None,
        "tokens_per_char": trainable.tokens_per_char(tok, eval_records),
        "train_s": round(time.time() - t, 1),
        # optimizer steps of this session only, the learning-curve evaluations inside them taken out
        "train_s_per_step": round((runtime - clock.eval_s) / max(ran, 1), 3),
        # the typical step, without the compile warm-up of the first steps: what to compare speeds by
        "median_s_per_step": round(float(np.median(clock.step_s)), 4) if ran else None,
        "steady_s_per_step": round(clock.steady_s_per_step(), 4) if ran else None,
        # real (non-pad) tokens an optimizer step trains on, on average: the numerator of tokens/s and MFU
        "tokens_per_step": round(sum(len(f["input_ids"]) for f in feats) / len(feats) * p.micro_batch_size * p.grad_accum, 1),
        "n_train": len(feats), "n_skipped": len(skipped), "n_eval": len(eval_records),
        "num_processes": world_size(), "gpu": results.hardware()["gpu"],
        # each process's median step and the part of it in fetching the batches (waiting for the GPU included)
        "per_process": per_process(clock.step_s, trainer.fetch_s),
    }
    if trainer.is_world_process_zero():  # the main process alone writes files
        model.save_pretrained(out / "final_adapter")
        # each step of this session, for where a mean and a median differ (a slow step now and then)
        (out / "step_seconds.json").write_text(json.dumps([round(s, 4) for s in clock.step_s]))
        runs.save_finished(out, summary, curve)
    return FinetuneResult(curve.assign(model=p.model), summary, out, model, tok)


def _soup(p, train_records, eval_records, out: Path) -> FinetuneResult:
    """p.soup_seeds runs (each in out/seed-<seed>, trained or read back like any run), their best models
    averaged into out/best_adapter (the model 01 goes on with), each member and the soup scored alike."""
    if world_size() > 1:  # every process would average and write the same files
        raise ValueError("a soup is made by one process: run it without accelerate launch (num_processes: N "
                         "still trains each of its runs on N GPUs), or train one run per process with --soup-member")
    run = runs.describe(p, reverse.training_records(train_records, p.reverse_pairs, p.seed), eval_records)
    if p.resume and (summary := runs.finished(out, run)):
        print(f"{p.model}: reusing the finished soup in {out} (same recipe and data)", flush=True)
        return _read_back(out, summary, p.model)
    runs.claim(out, run, p.resume)
    members = {q.seed: finetune(q, train_records, eval_records, soup.member_dir(out, q)) for q in soup.member_params(p)}
    for m in members.values():
        m.model = None  # a trained copy in this process goes before the members are loaded again
    missing = [str(m.out / "best_adapter") for m in members.values() if not (m.out / "best_adapter").is_dir()]
    if missing:  # a run read back from its summary and curve alone (results carried without weights)
        raise runs.RunError(f"the soup averages its runs' best models, and {', '.join(missing)} is missing: copy that "
                            "run's folder with its best_adapter/ here, or delete the run's folder to train it again")
    tok = models.load_tokenizer(p.model)
    prompts_ = [prompts.build(r["instruction"], p.template) for r in eval_records]

    def score(model):
        with torch.no_grad():
            df = evaluate.score_records(model.eval(), tok, eval_records, prompts_, p.eval_batch_size, p.max_length)
        return curve_row(df)

    # every member's best model scored by the same code as the soup (its curve's best row was scored inside
    # training), as it is loaded for the average: the table compares like with like
    scored = {}  # best model's folder -> its scores

    def load_and_score(folder):
        model = trainable.load_adapted(p, folder)[0]
        scored[folder] = score(model)
        return model

    model = soup.make(load_and_score, [m.out / "best_adapter" for m in members.values()], out / "best_adapter")
    mixed = score(model)
    first = next(iter(members.values())).summary
    best_step = max(m.summary["best_step"] for m in members.values())
    curve = pd.concat([m.curve.assign(run=f"seed {seed}", model=f"{p.model}, seed {seed}") for seed, m in members.items()]
                      + [pd.DataFrame([{"step": best_step, **mixed, "run": "soup", "model": f"{p.model}, soup"}])],
                      ignore_index=True)
    summary = {
        **first,  # the curve's own numbers (zero-shot, last, steps, speed) are the first member's
        "fingerprint": run["fingerprint"], "best_ppl": mixed["eval_ppl"], "best_bits_per_char": mixed["eval_bits_per_char"],
        "best_step": best_step, "train_s": round(sum(m.summary["train_s"] for m in members.values()), 1),
        "soup": {"seeds": list(members), "soup": mixed,
                 "members": [{"seed": seed, "best_step": m.summary["best_step"], **scored[m.out / "best_adapter"]}
                             for seed, m in members.items()]},
    }
    runs.save_finished(out, summary, curve)
    return FinetuneResult(curve, summary, out)
