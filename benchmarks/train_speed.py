"""QLoRA training throughput: the project's trainer vs a naive HF-Trainer baseline, in one run.

Both: NF4 + double quant base, LoRA r=64 on all 7 projections, gradient checkpointing, the same
records, micro-batch and effective batch. Baseline: plain `Trainer` (the model's own loss over full
logits), the seed's fp32 compute dtype, padding to the longest in a random batch. Project: answer-only
LM head (lib.train.AnswerLossTrainer), bf16 compute, length-grouped batches. Prints real (non-pad)
tokens/s, peak GPU memory, the ratio, and both loss curves (random weights: speed and memory of QLoRA do
not depend on the weight values).

    python benchmarks/train_speed.py --config cfg/gemma3-270m.json --tokenizer tok/ --data-dir data/raw
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from lib import data, models, params, train


class Counting:
    """Wraps a collator and counts the real (non-pad) tokens it hands out."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def __call__(self, feats):
        batch = self.inner(feats)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


class Clock(TrainerCallback):
    """Wall time and tokens between the end of warm-up step `warm` and the end of training."""

    def __init__(self, collator, warm):
        self.collator, self.warm, self.t0, self.tok0, self.dt, self.tokens = collator, warm, None, 0, None, None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warm:
            torch.cuda.synchronize()
            self.t0, self.tok0 = time.perf_counter(), self.collator.tokens

    def on_train_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.dt, self.tokens = time.perf_counter() - self.t0, self.collator.tokens - self.tok0


def random_model(config: str, folder: Path) -> Path:
    """Random weights of an architecture, saved once in bf16 so the NF4 loader can quantize them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=torch.bfloat16)
        m.save_pretrained(folder)
        del m
    return folder


def features(tok, a):
    recs = data.load_split(a.data_dir, "train", limit=a.records)
    feats, cut = train.encode_examples(tok, recs, "course", a.max_length)
    vocab = a.vocab or len(tok)
    for f in feats:  # a proxy tokenizer's ids folded into the benchmarked model's vocabulary
        f["input_ids"] = [i % vocab for i in f["input_ids"]]
        f["labels"] = [i if i < 0 else i % vocab for i in f["labels"]]
    n = sum(len(f["input_ids"]) for f in feats)
    print(f"{len(feats)} records, {n / len(feats):.1f} tokens each on average, {cut} cut at {a.max_length}")
    return feats


def run(mode, model_dir, feats, tok, a):
    """mode: baseline or project, the latter with -pack (padding-free rows) and/or -nogc (no checkpointing)."""
    project = mode.startswith("project")
    p = params.TrainParams(model=str(model_dir), compute_dtype="bfloat16" if project else "float32",
                           micro_batch_size=a.micro_batch, grad_accum=a.grad_accum, max_steps=a.steps,
                           logging_steps=1, save_steps=10 ** 6, eval_steps=1, answer_loss=project,
                           group_by_length=project, lr_scheduler="constant", seed=0,
                           gradient_checkpointing="nogc" not in mode, packing="pack" in mode)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = train.add_lora(models.load_model(p.model, "nf4", p.compute_dtype, "cuda"), p)
    collator = Counting(train.PackCollator() if p.packing else train.PadCollator(tok.pad_token_id or 0))
    clock = Clock(collator, a.warmup)
    out = Path(a.work) / mode
    args = train.training_args(p, out, len(feats))
    args.save_strategy = "no"
    cls = train.AnswerLossTrainer if project else Trainer
    trainer = cls(model=model, args=args, train_dataset=feats, data_collator=collator, callbacks=[clock])
    trainer.train()
    losses = [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "tokens_per_s": round(clock.tokens / clock.dt), "peak_gib": round(peak, 2),
            "s_per_step": round(clock.dt / (a.steps - a.warmup), 3), "losses": losses}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a model name/path with real weights (instead of --config)")
    ap.add_argument("--config", help="architecture config.json (random weights)")
    ap.add_argument("--tokenizer", help="tokenizer folder for the course data (default: the model's)")
    ap.add_argument("--vocab", type=int, default=0, help="fold token ids into this vocabulary (proxy tokenizer)")
    ap.add_argument("--data-dir", default="data/raw")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default="baseline,project")
    ap.add_argument("--work", default="/tmp/train_speed")
    ap.add_argument("--json", help="also write the full result (loss curves included) here")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer) if a.tokenizer else models.load_tokenizer(a.model)
    feats = features(tok, a)
    if a.model:
        model_dir = models.model_path(a.model)
    else:
        model_dir = random_model(a.config, Path(a.work) / ("model-" + Path(a.config).stem))
    rows = [run(m, model_dir, feats, tok, a) for m in a.modes.split(",")]
    base = rows[0]
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
    result = {"device": torch.cuda.get_device_name(0), "model": a.model or a.config,
              "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    for r in rows:  # the loss curves are in the JSON; the table is what a reader wants first
        tail = r["losses"][-10:]
        print(f"{r['mode']:14s} {r['tokens_per_s']:>7d} tok/s  peak {r['peak_gib']:6.2f} GiB  "
              f"{r['s_per_step']:.3f} s/step  x{r['speedup']:.2f}  mean loss last 10 steps {sum(tail) / len(tail):.3f}")


if __name__ == "__main__":
    main()
