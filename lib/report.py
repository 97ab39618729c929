"""05_report: tables and figures from the saved results of 01-04 (never recomputed)."""

import pandas as pd

from . import resolve, results

SECTIONS = {"01_finetune": "QLoRA fine-tuning", "02_zeroshot": "zero-shot prompts",
            "03_fewshot_sweep": "few-shot sweep", "04_plm_compare": "PLM comparison"}
SEED_PPL = {"zero-shot": 5.454, "few-shot": 4.687, "QLoRA": 3.324}  # the seed report, Taiwan-LLM-7B

HYPERPARAMETERS = ["model", "quantization", "compute_dtype", "lora_r", "lora_alpha", "lora_dropout",
                   "target_modules", "micro_batch_size", "grad_accum", "epochs", "max_steps", "learning_rate",
                   "lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay", "gradient_checkpointing",
                   "eval_steps", "template", "max_length", "data_dir", "train_limit", "eval_limit"]


def show(df, precision=3):
    """A table without the index column, floats rounded, for the rendered report."""
    return df.style.hide(axis="index").format(precision=precision)


class Missing(Exception):
    """A notebook's results are not in the run folder."""


def load_all(run_dir) -> dict:
    """{section: (results.json, tables) or Missing} for every section of a run folder."""
    out, run_dir = {}, resolve(run_dir)  # relative to the project root, as every params path
    for name in SECTIONS:
        folder = run_dir / name
        if (folder / "results.json").exists():
            out[name] = results.load(folder)
        else:
            out[name] = Missing(f"No results of {name} in {folder}. Run notebooks/{name}.ipynb with "
                                f"out_dir={run_dir}, or: python -m lib.pipeline PARAMS --only {name} "
                                f"--run-dir {run_dir}")
    return out


def get(res, name):
    """(doc, tables) of a section; raises Missing with the notebook to run."""
    if isinstance(res[name], Missing):
        raise res[name]
    return res[name]


def hyperparameters(res) -> pd.DataFrame:
    params = get(res, "01_finetune")[0]["provenance"]["params"]
    return pd.DataFrame([{"parameter": k, "value": str(params[k])} for k in HYPERPARAMETERS if k in params])


def finetune_summary(res) -> pd.DataFrame:
    s = get(res, "01_finetune")[0]["summary"]
    keys = ["model", "zero_shot_ppl", "best_ppl", "best_step", "final_ppl", "steps", "n_train", "n_eval",
            "trainable_params", "train_s_per_step"]
    return pd.DataFrame([{k: s[k] for k in keys}])


def comparison(res) -> pd.DataFrame:
    """Zero-shot vs few-shot vs LoRA (the seed's comparison), with its 'what each uses' matrix."""
    zs = get(res, "02_zeroshot")[1]["summary"]
    fs = get(res, "03_fewshot_sweep")[0]["summary"]["best"]
    ft = get(res, "01_finetune")[0]["summary"]
    course = zs[zs.template == "course"].mean_ppl
    rows = [("zero-shot", "course prompt", float(course.iloc[0]) if len(course) else float(zs.mean_ppl.min())),
            ("few-shot", f"{fs['strategy']}, k={fs['k']}", fs["mean_ppl"]),
            ("QLoRA", f"best step {ft['best_step']}", ft["best_ppl"])]
    uses = {"zero-shot": ("v", "", ""), "few-shot": ("v", "v", ""), "QLoRA": ("v", "v", "v")}
    return pd.DataFrame([{"method": m, "setting": s, "mean_ppl": v, "seed report (7B)": SEED_PPL[m],
                          "pretrained model": uses[m][0], "example": uses[m][1], "fine-tune": uses[m][2]}
                         for m, s, v in rows])


def provenance(res) -> pd.DataFrame:
    rows = []
    for name in SECTIONS:
        if isinstance(res[name], Missing):
            rows.append({"notebook": name, "status": "missing"})
            continue
        pv = res[name][0]["provenance"]
        rows.append({"notebook": name, "status": "ok", "commit": (pv["git"]["commit"] or "")[:10],
                     "dirty": pv["git"]["dirty"], "finished": pv["finished"], "wall_s": pv["wall_s"],
                     "models": ", ".join(f"{m['model']} ({str(m['sha256'])[:12]})" for m in pv["models"]),
                     "hardware": pv["hardware"]["gpu"] or f"CPU x{pv['hardware']['cpus']}",
                     **{k: v for k, v in pv["versions"].items() if k in ("torch", "transformers", "peft", "bitsandbytes")}})
    return pd.DataFrame(rows)
