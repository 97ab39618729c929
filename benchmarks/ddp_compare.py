"""01's fine-tuning on one GPU and on N GPUs of the same host, at the same effective batch: both learning
curves, their largest relative difference, and the speed ratio (optimizer steps carry the same tokens, so
tokens/s of N over 1 = seconds per step of 1 over N), measured in one run.

    python benchmarks/ddp_compare.py params/course.yaml --out /tmp/ddp [--processes 2] [+key=value ...]

`+key=value` changes a field of the `train` recipe (e.g. +max_steps=300 +compile=false).
Writes DIR/ddp_compare.json (after each run: a cut call keeps the 1-GPU run) and DIR/ddp_curves.png.
Run again with the same DIR to go on: a finished run is read back, not trained again.
"""
import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import models, paramfile, params, plots, results  # noqa: E402
from lib.cli import one_line_errors  # noqa: E402

from gpu_meter import apart, flops_per_token, mfu  # noqa: E402  beside this file


def run(p, n: int, out: Path) -> dict:
    cfg = paramfile.dump_train(dataclasses.replace(p, num_processes=n), out / f"p{n}.yaml")
    r = subprocess.run([sys.executable, "-m", "lib.train", str(cfg), "--out", str(out / f"n{n}")], cwd=ROOT)
    if r.returncode:
        return {"processes": n, "error": f"exit {r.returncode}"}
    summary = json.loads((out / f"n{n}" / "summary.json").read_text())
    return {"processes": n, "summary": summary, "curve": pd.read_csv(out / f"n{n}" / "curve.csv")}


def speed(r: dict, flops_token: float, rate: float) -> dict:
    """tokens/s of a finished run (its typical step: the median, without compile warm-up) and its model
    FLOP utilisation per GPU against the bf16 matmul rate measured in this run."""
    s = r["summary"]
    tokens_s = s["tokens_per_step"] / s["median_s_per_step"]
    out = {"tokens_per_s": round(tokens_s), "mfu": mfu(tokens_s, r["processes"], flops_token, rate)}
    if s.get("steady_s_per_step"):  # runs from before it was recorded have none
        out["tokens_per_s_steady"] = round(s["tokens_per_step"] / s["steady_s_per_step"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params")
    ap.add_argument("--out", required=True)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("changes", nargs="*", help="+key=value changes of the train recipe")
    a = ap.parse_intermixed_args()  # the +changes may follow --out
    p = paramfile.load(a.params)["01_finetune"]
    p = dataclasses.replace(p, **paramfile.parse_changes(a.changes, params.TrainParams))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # the device's facts by processes that then exit: this one holds no CUDA context while its runs train
    rate = apart("gpu_meter", "matmul_rate")  # before the runs, on an idle GPU
    hardware = apart("lib.results", "hardware")
    flops_token = flops_per_token(models.model_path(p.model), p)
    runs = []
    for n in (1, a.processes):
        r = run(p, n, out)
        if "summary" in r:
            r |= speed(r, flops_token, rate)
            print(f"{n} process(es): {r['tokens_per_s']} tokens/s, MFU {r['mfu'] * 100:.1f}% a GPU "
                  f"(bf16 matmul rate measured here: {rate / 1e12:.1f} TFLOP/s)", flush=True)
        runs.append(r)
        doc = document(p, rate, hardware, runs)  # after each run: a call cut during the next keeps this one
        (out / "ddp_compare.json").write_text(json.dumps(doc, indent=2, default=str))
    one, many = runs
    if "curve" in one and "curve" in many:
        c1, cn = one["curve"].set_index("step"), many["curve"].set_index("step")
        rel = ((cn.eval_ppl - c1.eval_ppl).abs() / c1.eval_ppl).max()
        key = "median_s_per_step"  # the mean (train_s_per_step) carries each session's compile warm-up
        doc |= {"max_rel_diff_eval_ppl": float(rel), "speedup": one["summary"][key] / many["summary"][key]}
        if one["summary"].get("steady_s_per_step") and many["summary"].get("steady_s_per_step"):
            # the mean step after warm-up: what a run's wall time goes by (the median is the host's pace)
            doc["speedup_steady"] = one["summary"]["steady_s_per_step"] / many["summary"]["steady_s_per_step"]
        both = pd.concat([one["curve"].assign(run="1 GPU"), many["curve"].assign(run=f"{a.processes} GPUs")])
        plots.save(plots.learning_curves(both, hue="run"), out / "ddp_curves.png")
        steady = f" ({doc['speedup_steady']:.2f}x by the mean step after warm-up)" if "speedup_steady" in doc else ""
        print(f"{a.processes} GPUs over 1: {doc['speedup']:.2f}x the tokens/s by the median step{steady}; curves "
              f"differ by at most {rel * 100:.2f}% (relative, eval ppl)")
        (out / "ddp_compare.json").write_text(json.dumps(doc, indent=2, default=str))


def document(p, rate, hardware, runs) -> dict:
    """The JSON of the runs so far, with provenance."""
    return {"params": p.to_dict(), "hardware": hardware, "versions": results.versions(),
            "matmul_flops_per_s": rate, "git": results.git_state(),
            "runs": [{k: v for k, v in r.items() if k != "curve"} | (
                {"curve": r["curve"].to_dict(orient="records")} if "curve" in r else {}) for r in runs]}


if __name__ == "__main__":
    with one_line_errors() as cli:  # a bad key=value is one line, not a traceback
        main()
    sys.exit(cli.code)
