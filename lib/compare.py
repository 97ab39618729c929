"""PLM comparison: the same QLoRA recipe on several base models (the seed's Q3)."""
import gc

import pandas as pd
import torch

from . import train


def run_models(p, train_records, eval_records, out):
    """Fine-tune each model in p.models into out/<model>/; returns (summary table, all curves)."""
    rows, curves = [], []
    for name in p.models:
        print(f"--- {name} ---", flush=True)
        run = train.finetune if p.num_processes == 1 else train.finetune_distributed  # DDP via accelerate
        model, _, curve, summary = run(p, train_records, eval_records, out / _safe(name), model_name=name)
        rows.append(summary)
        curves.append(curve)
        del model  # two 7B models don't fit together; free before the next
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


def _safe(name: str) -> str:
    """A folder name for a model id (hub ids have slashes)."""
    return name.replace("/", "__")
