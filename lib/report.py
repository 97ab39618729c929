"""05_report: tables, figures and the discussion from the saved results of 01-04 (never recomputed)."""
import json
import math
from dataclasses import fields

import pandas as pd

from . import compare, resolve, results
from .params import TRAIN_GROUPS, TrainParams, kept, method

SECTIONS = {"01_finetune": "fine-tuning", "02_zeroshot": "zero-shot prompts",
            "03_fewshot_sweep": "few-shot sweep", "04_plm_compare": "PLM comparison"}
# The seed report (Taiwan-LLM-7B-v2.0-chat, public test) and its tokenizer's answer tokens per character
# (../shared/CONVENTIONS.md): log2(mean ppl) x tokens/char is an upper estimate of its bits per character,
# since the mean of per-example perplexities is at least exp of the mean NLL.
SEED_PPL = {"zero-shot": 5.454, "few-shot": 4.687, "fine-tuned": 3.324}  # the seed fine-tuned with QLoRA
SEED_TOKENS_PER_CHAR = 1.86
DIRECTIONS = ("all", "classical", "modern")


def seed_bits_per_char(ppl: float) -> float:
    return math.log2(ppl) * SEED_TOKENS_PER_CHAR


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


def group_of(name: str) -> str:
    """The group a fine-tuning field belongs to ('model and data' for Common's), for tables."""
    for title, g in TRAIN_GROUPS.items():
        if name in {f.name for f in fields(g)}:
            return title
    return "model and data"


def ran_with(res, notebook: str = "01_finetune") -> dict:
    """The params a notebook ran with, as its results recorded them."""
    return get(res, notebook)[0]["provenance"]["params"]


def hyperparameters(res) -> pd.DataFrame:
    """Every field of the fine-tuning recipe as 01 ran it, by group (derived from TrainParams)."""
    params = ran_with(res)
    names = [f for f in TrainParams.__dataclass_fields__ if f not in ("run", "out_dir")]
    return pd.DataFrame([{"group": group_of(k), "parameter": k, "value": str(params[k])} for k in names if k in params])


def finetune_summary(res) -> pd.DataFrame:
    s = get(res, "01_finetune")[0]["summary"]
    keys = ["model", "zero_shot_ppl", "best_ppl", "best_step", "final_ppl", "steps", "best_bits_per_char",
            "n_train", "n_eval", "trainable_params", "train_s_per_step"]
    return pd.DataFrame([{k: s.get(k) for k in keys}])


def _by_direction(df) -> dict:
    """{direction: (mean ppl, bits per char)} of per-example rows."""
    from .evaluate import bits_per_char

    out = {"all": (df.ppl.mean(), bits_per_char(df))}
    out.update({d: (g.ppl.mean(), bits_per_char(g)) for d, g in df.groupby("direction")})
    return out


def _chrf(scores: pd.DataFrame, setting_prefix: str) -> dict:
    rows = scores[scores.setting.str.startswith(setting_prefix)]
    return dict(zip(rows.direction, rows.chrF))


def finetune_method(res, notebook: str = "01_finetune") -> str:
    """'QLoRA', 'LoRA' or 'full fine-tuning' (', pairs both ways'): how a notebook's run fine-tuned (an
    adapter on a 4-bit NF4 or a 16-bit base, or every weight), 01's unless another is named (04's ladder)."""
    used = ran_with(res, notebook)
    return method(used.get("quantization", "nf4"), used.get("full_finetune", False), used.get("reverse_pairs", False))


def tuned_setting(ft_doc) -> str:
    """params.kept() of 01's run, from its results."""
    used = ft_doc["provenance"]["params"]
    return kept(used.get("full_finetune", False), ft_doc["summary"]["best_step"], used.get("num_beams", 1),
                used.get("mbr_candidates", 1), used.get("soup_seeds", 1))


def headline(res) -> pd.DataFrame:
    """Zero-shot / best few-shot / fine-tuned (QLoRA or LoRA) per direction: mean ppl, bits per char, chrF;
    the seed beside."""
    zs = get(res, "02_zeroshot")[1]["per_example"]
    fs_doc, fs = get(res, "03_fewshot_sweep")
    ft_doc, ft = get(res, "01_finetune")
    best = fs_doc["summary"]["best"]
    pe = fs["per_example"]
    few = pe[(pe.strategy == best["strategy"]) & (pe.k == best["k"])]
    rows = ft["curve"]
    if "run" in rows:  # a soup's curve: its members' curves and the soup's own row (lib.finetune)
        rows = rows[rows.run == "soup"]
    curve = rows.set_index("step").loc[ft_doc["summary"]["best_step"]]
    suffix = {d: "" if d == "all" else f"_{d}" for d in DIRECTIONS}  # the curve's column per direction
    tuned = {d: (curve[f"eval_ppl{s}"], curve[f"eval_bits_per_char{s}"]) for d, s in suffix.items()
             if f"eval_ppl{s}" in curve}
    rows = [("zero-shot", "zero-shot", "course prompt", _by_direction(zs[zs.template == "course"]),
             _chrf(fs["quality"], "zero-shot")),
            ("few-shot", "few-shot", f"{best['strategy']}, k={best['k']}", _by_direction(few), _chrf(fs["quality"], "few-shot")),
            ("fine-tuned", finetune_method(res), tuned_setting(ft_doc), tuned,
             _chrf(ft["quality"], ""))]  # 01's quality rows are all the fine-tuned model's
    out = []
    for kind, name, setting, values, chrf in rows:
        for d, (ppl, bpc) in values.items():
            seed = SEED_PPL[kind] if d == "all" else None
            out.append({"method": name, "setting": setting, "direction": d, "mean_ppl": ppl, "bits_per_char": bpc,
                        "chrF": chrf.get(d), "seed_7b_mean_ppl": seed,
                        "seed_7b_bits_per_char_upper": seed_bits_per_char(seed) if seed else None})
    return pd.DataFrame(out)


def quality(res) -> pd.DataFrame:
    """chrF/BLEU of generated answers: zero-shot and best few-shot (03), the fine-tuned model (01)."""
    frames = [get(res, "03_fewshot_sweep")[1]["quality"], get(res, "01_finetune")[1]["quality"]]
    return pd.concat(frames, ignore_index=True)[["setting", "direction", "chrF", "BLEU", "n"]]


def examples(res) -> pd.DataFrame:
    """The same public-test records answered zero-shot, few-shot and by the fine-tuned model."""
    fs = get(res, "03_fewshot_sweep")[1]["examples"]
    ft = get(res, "01_finetune")[1]["examples"][["instruction", "output"]].rename(columns={"output": finetune_method(res)})
    return fs.merge(ft, on="instruction")  # the records both notebooks showed


def ladder_table(res) -> pd.DataFrame:
    table = get(res, "04_plm_compare")[1]["summary"]
    return table[[c for c in compare.COLUMNS if c in table]].sort_values("nominal_params")


def _fewshot_bits(res) -> dict:
    """{model: best few-shot bits per char} where 03 ran for that model."""
    if isinstance(res["03_fewshot_sweep"], Missing):
        return {}
    s = res["03_fewshot_sweep"][0]["summary"]
    return {s.get("model"): s["best"].get("bits_per_char")}


def ladder(res) -> pd.DataFrame:
    return compare.ladder(get(res, "04_plm_compare")[1]["summary"], _fewshot_bits(res))


SWEEP = "recipe_sweep/recipe_sweep.json"  # where benchmarks/recipe_sweep.py --out <run folder>/recipe_sweep writes
SILENT = {"cache_dequantized"}  # follows from quantization: none (no 4-bit layers to cache); left out of labels


def load_sweep(run_dir) -> dict | None:
    """A recipe sweep run beside the study (benchmarks/recipe_sweep.py), if the run folder has one."""
    path = resolve(run_dir) / SWEEP
    return json.loads(path.read_text()) if path.exists() else None


def sweep_label(changes: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in changes.items() if k not in SILENT) or "the params file's recipe"


def sweep_table(doc: dict) -> pd.DataFrame:
    """One row a variant: its changes, best and last public-test mean ppl, bits per char, chrF (all directions)."""
    rows = []
    for r in doc["rows"]:
        done = "best_ppl" in r
        chrf = next((q["chrF"] for q in r.get("quality") or [] if q["direction"] == "all"), None)
        rows.append({"changes": sweep_label(r["changes"]), "best_ppl": r.get("best_ppl"), "best_step": r.get("best_step"),
                     "best_bits_per_char": r.get("best_bits_per_char"), "chrF": chrf,
                     "last_ppl": r["curve"][-1]["eval_ppl"] if done else None,
                     "last_step": r["curve"][-1]["step"] if done else None})
    return pd.DataFrame(rows)


def sweep_note(doc: dict) -> str:
    """What the sweep is, on which card: its own description if it has one."""
    gpu = doc.get("hardware", {}).get("gpu") or "CPU"
    what = doc.get("what") or (f"{len(doc['rows'])} variants of the recipe (the first row: the params file's own), "
                               "each trained by lib.train; chrF of each best adapter's greedy answers.")
    return f"{what} Card: {gpu}. Settings are chosen on the public test, as the seed did."


def sweep_curves(doc: dict) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(r["curve"]).assign(variant=sweep_label(r["changes"]))
                      for r in doc["rows"] if "curve" in r], ignore_index=True)


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

