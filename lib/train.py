"""QLoRA fine-tuning with the HF Trainer: answer-only loss, learning curve, best adapter, resume.

Sequences are built by evaluate.encode, so the training loss and the course metric score exactly the
same tokens (output + EOS given BOS + prompt).
"""
import math
from pathlib import Path

import pandas as pd
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from . import evaluate, nf4, prompts, speedups
from .launch import per_process_accum

IGNORE = -100  # label value the loss skips


def encode_examples(tok, records, template, max_length) -> tuple[list[dict], int]:
    """Training features (input_ids, labels with the prompt masked) and how many were cut."""
    feats, cut = [], 0
    for r in records:
        e = evaluate.encode(tok, prompts.build(r["instruction"], template), r["output"], max_length)
        cut += e.truncated
        labels = [IGNORE] * e.n_prompt + e.input_ids[e.n_prompt:]
        feats.append({"input_ids": e.input_ids, "labels": labels})
    return feats, cut


class PadCollator:
    """Right-pads a batch; pads get attention 0 and label IGNORE."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, feats):
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id)
        labels = torch.full((len(feats), width), IGNORE)
        attn = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


class PackCollator:
    """Padding-free rows: the micro-batch's sequences laid end to end, positions restarting at 0.

    Sequences go into rows of at most row_tokens (first fit, longest first; a longer sequence gets a
    row of its own), so attention stays as cheap as in short rows; the rows are right-padded to the
    longest. No attention mask: transformers reads the sequence boundaries from position_ids and
    attends only within each sequence, so every example's loss is what it is alone (tested). Each
    sequence starts with BOS, whose label is IGNORE, so no token is trained to predict the next
    example; pads sit after every real token of their row (causal attention never sees them) and
    carry label IGNORE.
    """

    def __init__(self, pad_id=0, row_tokens=512, multiple=8):
        # widths rounded up to a multiple of 8: a compiled model specializes on width % 8 and would
        # otherwise recompile (tens of seconds each) whenever a batch's width changes that remainder
        self.pad_id, self.row_tokens, self.multiple = pad_id, row_tokens, multiple

    def rows(self, lengths) -> list[list[int]]:
        """Indices of the sequences in each row."""
        rows, room = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
            if j is None:
                rows.append([i])
                room.append(self.row_tokens - lengths[i])
            else:
                rows[j].append(i)
                room[j] -= lengths[i]
        return rows

    def __call__(self, feats):
        rows = self.rows([len(f["input_ids"]) for f in feats])
        width = max(sum(len(feats[i]["input_ids"]) for i in r) for r in rows)
        width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), IGNORE)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            at = 0
            for i in r:
                n = len(feats[i]["input_ids"])
                ids[k, at:at + n] = torch.tensor(feats[i]["input_ids"])
                labels[k, at:at + n] = torch.tensor(feats[i]["labels"])
                pos[k, at:at + n] = torch.arange(n)
                at += n
            pos[k, at:] = torch.arange(width - at)  # the pad tail as one more (unscored) sequence
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def collator(p, tok):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return PackCollator(pad, p.pack_tokens) if p.packing else PadCollator(pad)


def add_lora(model, p):
    """Wrap a (4-bit) model with LoRA adapters on p.target_modules; the base stays frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if p.quantization == "nf4" and not p.keep_frozen_dtype:  # frozen weights to fp32, input grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing)
    else:
        model = speedups.prepare_frozen(model, p.gradient_checkpointing)
    missing = [m for m in p.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"target_modules {missing} not found in {p.model}")
    cfg = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, bias="none",
                     target_modules=list(p.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    if p.cache_dequantized:
        speedups.cache_dequantized(model)
    if p.lean_nf4:
        nf4.replace_4bit(model)
    if p.compile:
        speedups.compile_layers(model)
    return model


def trainable_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights count as stored elements)."""
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    return trainable, sum(x.numel() for x in model.parameters())


def planned_steps(p, n_train) -> int:
    """Optimizer steps the run will take (the same on 1 or N processes: the effective batch is fixed)."""
    if p.max_steps > 0:
        return p.max_steps
    per_epoch = math.ceil(n_train / (p.micro_batch_size * p.grad_accum))
    return math.ceil(per_epoch * p.epochs)


def check_inputs(p, train_records, eval_records):
    """Clear errors before any training starts."""
    if not train_records:
        raise ValueError("the training set is empty")
    if any("output" not in r for r in eval_records):
        raise ValueError(f"the eval set ({p.eval_split}) has records without 'output'; it cannot be scored")
    steps = planned_steps(p, len(train_records))
    if p.eval_steps > steps:
        raise ValueError(f"eval_steps={p.eval_steps} is larger than the run ({steps} optimizer steps)")


class CurveCallback(TrainerCallback):
    """Course-metric perplexity on the eval set every eval_steps (and at steps 0 and last).

    Rows go into state.log_history, which checkpoints carry, so a resumed run keeps its curve. A new
    best is saved as best_adapter/. Under DDP every process runs the same evaluation: their Trainer
    states stay identical (an evaluation on rank 0 alone hung the next checkpoint save in a 2-process
    run), and the main process alone writes files.
    """

    def __init__(self, tok, eval_records, p, out: Path):
        self.tok, self.records, self.p, self.out = tok, eval_records, p, out
        self.prompts = [prompts.build(r["instruction"], p.template) for r in eval_records]
        self.eval_s = 0.0  # time spent here, so seconds per step can leave it out

    def _evaluate(self, model, state):
        import time

        t = time.time()
        model.eval()
        with speedups.eager():
            df = evaluate.score_records(model, self.tok, self.records, self.prompts, self.p.eval_batch_size,
                                        self.p.max_length)
        model.train()
        row = {"step": state.global_step, "eval_ppl": float(df.ppl.mean()),
               "eval_bits_per_char": evaluate.bits_per_char(df)}
        row.update({f"eval_ppl_{d}": float(g.ppl.mean()) for d, g in df.groupby("direction")})
        state.log_history.append(row)
        if state.best_metric is None or row["eval_ppl"] < state.best_metric:
            state.best_metric, state.best_global_step = row["eval_ppl"], state.global_step
            if state.is_world_process_zero:
                model.save_pretrained(self.out / "best_adapter")
        if state.is_world_process_zero:
            print(f"step {state.global_step}: eval ppl {row['eval_ppl']:.3f}", flush=True)
        self.eval_s += time.time() - t

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self._evaluate(model, state)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.p.eval_steps == 0 or state.global_step == state.max_steps:
            self._evaluate(model, state)


class AnswerLossTrainer(Trainer):
    """Trainer whose loss runs the LM head only on answer tokens (evaluate.token_nll).

    Same value as the model's own loss on these labels, without the full-vocabulary logits of every
    prompt token: less memory, most of all for large vocabularies (Gemma: 262k). Under DDP the
    forward must go through the DDP wrapper for its gradient hooks, so there it falls back to the
    model's own loss (equal value, more memory).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if hasattr(model, "module"):  # wrapped by DDP
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        score = torch.zeros_like(labels, dtype=torch.bool)
        score[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts label t+1
        # accelerate puts bf16 autocast around model.forward; this path calls the decoder directly, so
        # it must do the same, or the LoRA matmuls run in fp32 with a cast around every one of them
        bf16 = bool(getattr(getattr(self, "args", None), "bf16", False))
        with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
            losses, _ = evaluate.token_nll(model, inputs["input_ids"], inputs.get("attention_mask"), score,
                                           inputs.get("position_ids"))
        # a sum over the items of all accumulated micro-batches, as HF does: exact token mean per step
        loss = losses.sum() / (num_items_in_batch if num_items_in_batch is not None else losses.numel())
        return (loss, None) if return_outputs else loss

    def floating_point_ops(self, inputs):
        """HF's value (6 x tokens x non-embedding parameters) with the parameters counted once: HF walks
        every module on every step, ~4% of a 7B QLoRA step's host time (py-spy)."""
        if not hasattr(self, "_flop_params"):
            self._flop_params = self.model.num_parameters(exclude_embeddings=True) if hasattr(
                self.model, "num_parameters") else 0
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 0 if ids is None else 6 * ids.numel() * self._flop_params


def training_args(p, out: Path, n_train: int) -> TrainingArguments:
    bf16 = p.compute_dtype == "bfloat16"
    return TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=p.micro_batch_size,
        gradient_accumulation_steps=per_process_accum(p.grad_accum, world_size()), max_steps=planned_steps(p, n_train),
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_ratio,
        max_grad_norm=p.max_grad_norm, weight_decay=p.weight_decay, optim=p.optim,
        logging_steps=p.logging_steps, save_strategy="steps", save_steps=p.save_steps,
        eval_strategy="no", report_to="none", seed=p.seed, data_seed=p.seed, bf16=bf16,
        use_cpu=(evaluate_device(p) == "cpu"), remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, save_only_model=False,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass
        train_sampling_strategy="group_by_length" if p.group_by_length else "random",
        # gradient checkpointing is set up by add_lora (peft's kbit preparation)
    )


def world_size() -> int:
    """Processes in this data-parallel run (1 unless started by accelerate launch)."""
    import os

    return int(os.environ.get("WORLD_SIZE", 1))


def evaluate_device(p) -> str:
    from .models import device_for

    return device_for(p.device)


def curve_table(log_history) -> pd.DataFrame:
    """Learning curve: eval perplexity rows joined with the nearest training loss by step."""
    ev = pd.DataFrame([r for r in log_history if "eval_ppl" in r])
    loss = pd.DataFrame([{"step": r["step"], "train_loss": r["loss"]} for r in log_history if "loss" in r])
    if loss.empty:
        return ev.assign(train_loss=float("nan"))
    return ev.merge(loss, on="step", how="left")


def fit(model, tok, train_records, eval_records, p, out: Path):
    """Train (resuming from out/checkpoints if present and p.resume); returns (trainer, curve)."""
    check_inputs(p, train_records, eval_records)
    feats, cut = encode_examples(tok, train_records, p.template, p.max_length)
    if cut:
        print(f"note: {cut} of {len(feats)} training sequences are longer than max_length={p.max_length} and were cut")
    out.mkdir(parents=True, exist_ok=True)
    trainer_cls = AnswerLossTrainer if p.answer_loss else Trainer
    trainer = trainer_cls(model=model, args=training_args(p, out, len(feats)), train_dataset=feats,
                      data_collator=collator(p, tok),
                      callbacks=[CurveCallback(tok, eval_records, p, out)])
    last = get_last_checkpoint(str(out / "checkpoints")) if (out / "checkpoints").exists() and p.resume else None
    if last:
        print(f"resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)
    if p.compile:
        speedups.uncompile(model)
    if not trainer.is_world_process_zero():  # evaluation, curve and files live on the main process
        return trainer, None
    model.save_pretrained(out / "final_adapter")
    return trainer, curve_table(trainer.state.log_history)


def _curve_callback(trainer) -> "CurveCallback":
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, CurveCallback))


def tokens_per_char(tok, records) -> float:
    """Answer tokens per answer character: how finely a tokenizer cuts this task's text."""
    n_tok = sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in records)
    return n_tok / sum(len(r["output"]) for r in records)


def finetune(p, train_records, eval_records, out: Path, model_name=None):
    """Load a base model, add LoRA, fit; returns (model, tok, curve, summary). Used by 01 and 04."""
    import time

    from . import models

    name = model_name or p.model
    tok = models.load_tokenizer(name)
    set_seed(p.seed)  # LoRA's A matrices are drawn at wrap time, before the Trainer seeds anything
    model = add_lora(models.load_model(name, p.quantization, p.compute_dtype, p.device), p)
    trainable, total = trainable_params(model)
    t = time.time()
    trainer, curve = fit(model, tok, train_records, eval_records, p, out)
    if curve is None:
        return model, tok, None, None
    best = curve.loc[curve.eval_ppl.idxmin()]
    steps = int(curve.step.max())
    summary = {
        "model": name, "zero_shot_ppl": float(curve.eval_ppl.iloc[0]), "best_ppl": float(best.eval_ppl),
        "best_step": int(best.step), "final_ppl": float(curve.eval_ppl.iloc[-1]), "steps": steps,
        "zero_shot_bits_per_char": float(curve.eval_bits_per_char.iloc[0]),
        "best_bits_per_char": float(best.eval_bits_per_char),
        "trainable_params": trainable, "total_params": total, "tokens_per_char": tokens_per_char(tok, eval_records),
        "train_s": round(time.time() - t, 1),
        # optimizer steps only: the learning-curve evaluations inside the run are taken out
        "train_s_per_step": round((trainer.state.log_history[-1].get("train_runtime", float("nan"))
                                   - _curve_callback(trainer).eval_s) / max(steps, 1), 2),
        "n_train": len(train_records), "n_eval": len(eval_records),
    }
    return model, tok, curve.assign(model=name), summary


def finetune_distributed(p, train_records, eval_records, out: Path, model_name=None):
    """finetune() on p.num_processes data-parallel processes (accelerate launch); same return value.

    The processes read the same params (written to out/params.yaml) and data; afterwards the final
    adapter is loaded here for predictions.
    """
    import json
    from dataclasses import fields

    import yaml
    from peft import PeftModel

    from . import launch, models
    from .params import FinetuneParams

    out.mkdir(parents=True, exist_ok=True)
    keys = {f.name for f in fields(FinetuneParams)}  # 04's params carry `models`, which lib.train lacks
    values = {k: v for k, v in p.to_dict().items() if k in keys} | {"model": model_name or p.model}
    cfg = out / "params.yaml"
    cfg.write_text(yaml.safe_dump({"01_finetune": values}, allow_unicode=True))
    launch.run(cfg, out, p.num_processes, cpu=evaluate_device(p) == "cpu")
    curve = pd.read_csv(out / "curve.csv")
    summary = json.loads((out / "summary.json").read_text())
    tok = models.load_tokenizer(values["model"])
    base = models.load_model(values["model"], p.quantization, p.compute_dtype, p.device)
    return PeftModel.from_pretrained(base, out / "final_adapter"), tok, curve.assign(model=values["model"]), summary


def main(argv=None):
    """Headless training: python -m lib.train [PARAMS_YAML] [--out DIR] (01_finetune's parameters)."""
    import argparse
    import json

    from . import data, params, resolve

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("params_file", nargs="?")
    ap.add_argument("--out", help="output folder (default: <out_dir>/01_finetune)")
    a = ap.parse_args(argv)
    p = params.load(a.params_file)["01_finetune"]
    out = Path(a.out) if a.out else resolve(p.out_dir) / "01_finetune"
    tr = data.load_split(p.data_dir, "train", limit=p.train_limit)
    ev = data.load_split(p.data_dir, p.eval_split, limit=p.eval_limit)
    _, _, curve, summary = finetune(p, tr, ev, out)
    if summary is None:  # not the main process
        return
    summary["num_processes"] = world_size()
    curve.to_csv(out / "curve.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
