"""PLM comparison (the seed's Q3): one QLoRA recipe on a ladder of base models, finished runs reused."""
import dataclasses
import gc

import pandas as pd
import torch

from .finetune import finetune

COLUMNS = ["model", "nominal_params", "zero_shot_ppl", "best_ppl", "best_step", "zero_shot_bits_per_char",
           "best_bits_per_char", "tokens_per_char", "trainable_params", "steps", "train_s_per_step", "gpu"]


def run_models(p, train_records, eval_records, out, also=()):
    """Fine-tune each of p.models into out/<model>/ unless a finished run of the same recipe and data is
    there or in `also` (01's folder); returns (summary table, all curves)."""
    rows, curves = [], []
    for name in p.models:
        print(f"--- {name} ---", flush=True)
        result = finetune(dataclasses.replace(p, model=name), train_records, eval_records, out / safe(name),
                          also=also)
        rows.append(result.summary)
        curves.append(result.curve)
        del result  # two 7B models don't fit together; free before the next
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


def safe(name: str) -> str:
    """A folder name for a model id (hub ids have slashes)."""
    return name.replace("/", "__")


def ladder(table, fewshot=None) -> pd.DataFrame:
    """Bits per character per model and setting (zero-shot, fine-tuned, best few-shot where 03 ran)."""
    rows = []
    for r in table.itertuples():
        # a model outside the registry has no nominal size: its trainable count still orders the axis
        settings = {"zero-shot": r.zero_shot_bits_per_char, "QLoRA (best)": r.best_bits_per_char}
        if fewshot and r.model in fewshot:
            settings["few-shot (best)"] = fewshot[r.model]
        rows += [{"model": r.model, "params": r.nominal_params or r.trainable_params, "setting": s, "bits_per_char": b}
                 for s, b in settings.items()]
    return pd.DataFrame(rows)
