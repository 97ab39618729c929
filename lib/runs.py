"""Fine-tuning run folders: what a run was (params and data fingerprint), its checkpoints, its record.

A folder holds one run. `run.json` is written when it starts; resuming it with other params or data is
an error, and a finished one (`summary.json` and `curve.csv`, all that must travel between machines) of
the same recipe and data is read back instead of trained again (01 re-run, 04's ladder). Checkpoints get a `complete` marker
once the Trainer has written all of their files, so one cut mid-save is skipped, not resumed from.
"""
import dataclasses
import hashlib
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from .params import TrainParams
from .results import atomic_write

# Settings that leave the learning curve alone: where the run goes, how often it logs and saves, batch
# sizes of evaluation, how many processes share the (unchanged) effective batch, and two that change only
# how the same work is launched: cpp_wrapper (the same kernels, from C++) and ddp_lean (the same sums).
NOT_RECIPE = {"run", "out_dir", "resume", "logging_steps", "save_steps", "device", "eval_batch_size",
              "num_processes", "cpp_wrapper", "ddp_lean"}
MARKER = "complete"


class RunError(RuntimeError):
    """A run folder cannot be used as asked (another run's folder, a corrupt checkpoint)."""


def records_hash(records) -> str:
    text = json.dumps([[r["id"], r["instruction"], r.get("output")] for r in records], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def describe(p, train_records, eval_records) -> dict:
    """The recipe and data of a run, and their fingerprint."""
    recipe = {f.name: getattr(p, f.name) for f in fields(TrainParams) if f.name not in NOT_RECIPE}
    data = {"train": records_hash(train_records), "n_train": len(train_records),
            "eval": records_hash(eval_records), "n_eval": len(eval_records)}
    doc = {"recipe": recipe, "data": data}
    return {"fingerprint": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16], **doc}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__}: {e}); the file is damaged. Start the run "
                       f"afresh: delete {path.parent}") from None


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two runs' recipes and data. A field added to the code since the old run was
    recorded counts as its default there, so old runs stay reusable when new options appear."""
    default = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
               for f in fields(TrainParams)}
    keys = sorted(set(old["recipe"]) | set(new["recipe"]))
    diff = [k for k in keys if old["recipe"].get(k, default.get(k)) != new["recipe"].get(k, default.get(k))]
    return diff + [f"data:{k}" for k in ("train", "eval") if old["data"][k] != new["data"][k]]


def claim(out: Path, run: dict, resume: bool):
    """Record that out holds this run; refuse a folder holding another run's checkpoints or results."""
    old = _read(out / "run.json")
    diff = _differences(old, run) if old is not None and resume else []
    if diff:
        raise RunError(f"{out} holds another run (differs in {', '.join(diff)}). "
                       f"Start fresh: choose another output folder, or delete {out}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "run.json", json.dumps(run, ensure_ascii=False, indent=2, default=str))


def finished(out: Path, run: dict) -> dict | None:
    """The summary of a finished run of this recipe and data in out, else None."""
    summary = _read(out / "summary.json")  # written last, after the adapters: its presence means done
    old = _read(out / "run.json") if summary else None
    ok = old is not None and not _differences(old, run) and (out / "curve.csv").exists()
    return summary if ok else None


def save_finished(out: Path, summary: dict, curve: pd.DataFrame):
    atomic_write(out / "curve.csv", curve.to_csv(index=False))
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))  # written last: the run is done


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (cut mid-save) are removed with a note."""
    folder = out / "checkpoints"
    found = sorted(folder.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]), reverse=True) \
        if folder.is_dir() else []
    for ckpt in found:
        if not (ckpt / MARKER).exists():
            print(f"note: {ckpt} was not completely written (cut mid-save); removed, resuming from an earlier one")
            shutil.rmtree(ckpt)
            continue
        if _read(ckpt / "trainer_state.json") is None:  # a damaged file raises inside _read
            raise RunError(f"{ckpt}: trainer_state.json is missing; the checkpoint is damaged. Delete {ckpt} "
                           "to resume from the one before it")
        return ckpt
    return None


class MarkComplete(TrainerCallback):
    """Writes the marker into a checkpoint after the Trainer has saved all of it."""

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / MARKER).write_text("")

