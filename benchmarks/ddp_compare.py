"""01's fine-tuning on one GPU and on N GPUs of the same host, at the same effective batch: both learning
curves, their largest relative difference, and the speed ratio (optimizer steps carry the same tokens, so
tokens/s of N over 1 = seconds per step of 1 over N), measured in one run.

    python benchmarks/ddp_compare.py params/course.yaml --out /tmp/ddp [--processes 2] [--repeats R] [+key=value ...]

`+key=value` changes a field of the `train` recipe (e.g. +max_steps=300 +compile=false).
`--repeats R` trains the pair R times, in the order 1, N, N, 1, 1, N, ... (each variant as often early as late
in the call, so a drift over the call cancels): the ratio is that of the mean steps over the repeats, and each
pair's own ratio is kept. One pair in sequence is not enough for a 10% question: on a 2 x H100 machine the
same run's step wandered by 10-20% with its place in the call (benchmarks/README.md).
`--budget-s S` starts no run expected to end more than S seconds after the script started (expected: as long
as the longest run on as many GPUs trained in this call, or of any before the first such): a device call's
limit then cuts no run mid-compile, and the runs not started are listed.
Writes DIR/ddp_compare.json (after each run: a call cut during the next keeps the runs before it) and
DIR/ddp_curves.png. Run again with the same DIR to go on: a finished run is read back, not trained again.
"""
import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from time import monotonic

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import models, paramfile, params, plots, results  # noqa: E402
from lib.cli import one_line_errors  # noqa: E402

from gpu_meter import apart, flops_per_token, mfu  # noqa: E402  beside this file


def run_folder(out: Path, n: int, repeat: int) -> Path:
    return out / (f"n{n}" if repeat == 0 else f"n{n}-r{repeat}")


def run(p, n: int, out: Path, repeat: int = 0) -> dict:
    cfg = paramfile.dump_train(dataclasses.replace(p, num_processes=n), out / f"p{n}.yaml")
    folder = run_folder(out, n, repeat)
    r = subprocess.run([sys.executable, "-m", "lib.train", str(cfg), "--out", str(folder)], cwd=ROOT)
    if r.returncode:
        return {"processes": n, "repeat": repeat, "error": f"exit {r.returncode}"}
    summary = json.loads((folder / "summary.json").read_text())
    return {"processes": n, "repeat": repeat, "summary": summary, "curve": pd.read_csv(folder / "curve.csv")}


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
    ap.add_argument("--repeats", type=int, default=1, help="train the pair this many times: 1, N, N, 1, ...")
    ap.add_argument("--budget-s", type=float, default=0, help="start no run expected to end later (0: no limit)")
    ap.add_argument("changes", nargs="*", help="+key=value changes of the train recipe")
    a = ap.parse_intermixed_args()  # the +changes may follow --out
    t0 = monotonic()
    if a.repeats < 1:
        raise SystemExit(f"--repeats {a.repeats}: at least 1")
    if a.budget_s < 0:
        raise SystemExit(f"--budget-s {a.budget_s}: seconds, or 0 for no limit")
    p = paramfile.load(a.params)["01_finetune"]
    p = dataclasses.replace(p, **paramfile.parse_changes(a.changes, params.TrainParams))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # the device's facts by processes that then exit: this one holds no CUDA context while its runs train
    rate = apart("gpu_meter", "matmul_rate")  # before the runs, on an idle GPU
    hardware = apart("lib.results", "hardware")
    flops_token = flops_per_token(models.model_path(p.model), p)
    plan = [(k, n) for k in range(a.repeats) for n in pair_order(k, a.processes)]
    runs, walls = [], {}
    doc = document(p, rate, hardware, runs)
    for i, (k, n) in enumerate(plan):
        left = a.budget_s - (monotonic() - t0)
        if a.budget_s and not fits(walls, n, left):
            print(f"not starting the {n}-process run (repeat {k}) nor the {len(plan) - i - 1} after it: "
                  f"{left:.0f} s of --budget-s left", flush=True)
            doc["not_started"] = [{"processes": m, "repeat": j} for j, m in plan[i:]]
            write(doc, out)
            break
        t, done_before = monotonic(), (run_folder(out, n, k) / "summary.json").exists()
        r = run(p, n, out, k)
        if not done_before:  # a run read back from an earlier call took seconds: no estimate of a new one
            walls.setdefault(n, []).append(monotonic() - t)
        if "summary" in r:
            r |= speed(r, flops_token, rate)
            print(f"{n} process(es): {r['tokens_per_s']} tokens/s, MFU {r['mfu'] * 100:.1f}% a GPU "
                  f"(bf16 matmul rate measured here: {rate / 1e12:.1f} TFLOP/s)", flush=True)
            if line := processes_line(r["summary"]):  # runs from before 2026-12-07 have no per_process
                print(f"  median step by process, and its part fetching the batches: {line}", flush=True)
        runs.append(r)
        doc = document(p, rate, hardware, runs)
        write(doc, out)  # after each run: a call cut during the next keeps this one
    compare(runs, a.processes, doc, out)


def fits(walls: dict, n: int, left: float) -> bool:
    """Whether a run on n processes is expected to end within `left` seconds: it takes as long as the
    longest run on n trained in this call (the first of a kind compiles cold), or of any kind before one on n."""
    done = walls.get(n) or [w for ws in walls.values() for w in ws]
    return not done or max(done) <= left


def pair_order(k: int, processes: int) -> tuple:
    """The k-th repeat's order: 1 then N, then N then 1 (ABBA), so neither variant is always the first."""
    return (1, processes) if k % 2 == 0 else (processes, 1)


def processes_line(s: dict) -> str:
    """Each process's median step and its median fetch (the batches, and the wait for its GPU's queue, which
    under DDP holds the all-reduce, i.e. the slower process): the rest is that process's own host work."""
    return "; ".join(f"{i}: {x['median_s_per_step']:.4f} s, {x['median_fetch_s']:.4f} s fetching"
                     for i, x in enumerate(s.get("per_process", [])))


def compare(runs: list, processes: int, doc: dict, out: Path):
    """The finished runs' curves against the first 1-GPU one, the speed ratios, the plot, the JSON."""
    done = [r for r in runs if "curve" in r]
    ones = [r for r in done if r["processes"] == 1]
    manys = [r for r in done if r["processes"] == processes]
    if not (ones and manys):
        return
    c1 = ones[0]["curve"].set_index("step")
    rel = max(((r["curve"].set_index("step").eval_ppl - c1.eval_ppl).abs() / c1.eval_ppl).max() for r in manys)
    doc |= {"max_rel_diff_eval_ppl": float(rel)} | ratios(ones, manys)
    both = pd.concat([ones[0]["curve"].assign(run="1 GPU"), manys[0]["curve"].assign(run=f"{processes} GPUs")])
    plots.save(plots.learning_curves(both, hue="run"), out / "ddp_curves.png")
    steady = f" ({doc['speedup_steady']:.2f}x by the mean step after warm-up)" if "speedup_steady" in doc else ""
    pairs = doc["speedup_pairs"]
    each = f"; pair by pair {', '.join(f'{x:.2f}x' for x in pairs)}" if len(pairs) > 1 else ""
    print(f"{processes} GPUs over 1: {doc['speedup']:.2f}x the tokens/s by the median step{steady}{each}; "
          f"curves differ by at most {rel * 100:.2f}% (relative, eval ppl)")
    write(doc, out)


def ratios(ones: list, manys: list) -> dict:
    """1-GPU over N-GPU step time, of the means over the repeats: by the median step (the mean,
    train_s_per_step, carries each session's compile warm-up) and, where recorded, by the mean step after
    warm-up (what a run's wall time goes by; the median is the host's pace); and each pair's own ratio."""
    mean = lambda rs, key: sum(r["summary"][key] for r in rs) / len(rs)  # noqa: E731
    out = {"speedup": mean(ones, "median_s_per_step") / mean(manys, "median_s_per_step"),
           "speedup_pairs": [o["summary"]["median_s_per_step"] / m["summary"]["median_s_per_step"]
                             for o, m in zip(ones, manys)]}
    if all(r["summary"].get("steady_s_per_step") for r in ones + manys):
        out["speedup_steady"] = mean(ones, "steady_s_per_step") / mean(manys, "steady_s_per_step")
    return out


def write(doc: dict, out: Path):
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
