"""Variants of 01's fine-tuning recipe trained side by side on one GPU, then each best adapter's chrF:
one table and one plot of learning curves, the params file's own recipe first (the baseline of every ratio).

    python benchmarks/recipe_sweep.py params/study.yaml --out DIR [--parallel 4] [--quality] \
        +epochs=1 +eval_steps=125 "lr_scheduler=cosine" "lr_scheduler=cosine lora_alpha=64" ...

Why side by side: a small model's training step leaves the GPU waiting on the host most of the time
(qwen2.5-coder-1.5b: 16 course records, ~1,700 tokens, in ~0.2 s is ~8.5k tokens/s, ~50 TFLOP/s at 6 GFLOP
a token, under a tenth of an H100's bf16 matmul rate), so several runs share one card: four 625-step runs
together took a median 0.16-0.20 s per optimizer step each on one H100
(reports/course-H200/recipe_sweep/recipe_sweep.json). Choose settings on the public test, as the seed did.

`+key=value` changes apply to every run (the baseline too); a quoted list of `key=value` is one variant.
Each run is `python -m lib.train` in DIR/<variant>/ (its log in train.log there). Run the same command
again to go on: a finished run is read back, an interrupted one resumes from its last checkpoint, and
chrF already measured (DIR/<variant>/quality.json) is not generated again.
Writes DIR/recipe_sweep.json and DIR/recipe_sweep.png; `--markdown DIR/recipe_sweep.json` prints its table.
With --out <a study's run folder>/recipe_sweep, 05_report shows the sweep as a section, and
`lib.publish` publishes it with the study.
"""
import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import data, generate, paramfile, params, plots, quality, report, results, trainable  # noqa: E402
from lib.cli import one_line_errors  # noqa: E402

def slug(changes: dict) -> str:
    """The variant's folder name: its changes, readable ('baseline' for none)."""
    text = "_".join(f"{k}={v}" for k, v in changes.items()) or "baseline"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text)


def last_eval(log: Path) -> str:
    """The last 'step N: eval ppl X' line a run printed (its progress), or ''."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if ": eval ppl " in x] if log.exists() else []
    return lines[-1].strip().lstrip("\r") if lines else ""


def train_all(jobs, parallel: int, on_finish=lambda name: None, poll_s: float = 2.0, report_s: float = 60.0) -> dict:
    """Run `python -m lib.train` for each (name, params file, folder), at most `parallel` at once.

    Every report_s seconds prints each running run's last evaluation; on_finish(name) after each run ends.
    Returns {name: exit code}. Ctrl-C stops every run (each resumes from its last checkpoint next time).
    """
    waiting, running, codes, reported = list(jobs), {}, {}, time.time()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                name, cfg, folder = waiting.pop(0)
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "train.log", "ab")
                cmd = [sys.executable, "-m", "lib.train", str(cfg), "--out", str(folder)]
                running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log, time.time(), folder)
                print(f"started  {name}", flush=True)
            for name, (proc, log, t0, _) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    codes[name] = proc.returncode
                    del running[name]
                    print(f"finished {name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
                    on_finish(name)
            if running and time.time() - reported >= report_s:
                reported = time.time()
                for name, (*_, folder) in running.items():
                    print(f"  {name}: {last_eval(folder / 'train.log') or 'starting'}", flush=True)
            time.sleep(poll_s)
    finally:
        for proc, log, _, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    return codes


def adapter_quality(p, folder: Path, records) -> list[dict]:
    """chrF/BLEU per direction of the best adapter's greedy answers (cached in folder/quality.json)."""
    cache = folder / "quality.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, tok = trainable.load_adapted(p, folder / "best_adapter")
    rows = quality.by_direction(records, generate.translate(model, tok, records, p, progress=False)).to_dict("records")
    results.atomic_write(cache, json.dumps(rows))
    return rows


def row(name: str, changes: dict, folder: Path) -> dict:
    """One variant's summary and curve, read from its run folder (None values if it did not finish)."""
    summary = folder / "summary.json"
    if not summary.exists():
        return {"variant": name, "changes": changes, "error": f"no summary: see {folder / 'train.log'}"}
    s = json.loads(summary.read_text())
    keep = ("best_ppl", "best_step", "best_bits_per_char", "final_ppl", "steps", "zero_shot_ppl", "median_s_per_step", "gpu")
    return {"variant": name, "changes": changes, **{k: s.get(k) for k in keep},
            "curve": pd.read_csv(folder / "curve.csv").to_dict(orient="records")}


def markdown(doc: dict) -> str:
    """The sweep as a markdown table (the README quotes it from the committed JSON with this function)."""
    lines = ["| changes to the recipe | best mean ppl (step) | bits/char | chrF | last mean ppl |", "|---|---|---|---|---|"]
    for r in report.sweep_table(doc).itertuples(index=False):
        if r.best_ppl != r.best_ppl or r.best_ppl is None:  # NaN: the run did not finish
            lines.append(f"| {r.changes} | not finished | | | |")
            continue
        chrf = "" if r.chrF is None or r.chrF != r.chrF else f"{r.chrF:.1f}"
        lines.append(f"| {r.changes} | {r.best_ppl:.2f} ({r.best_step:.0f}) | {r.best_bits_per_char:.3f} | {chrf} "
                     f"| {r.last_ppl:.2f} ({r.last_step:.0f}) |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", nargs="?")
    ap.add_argument("--out")
    ap.add_argument("--parallel", type=int, default=4, help="runs at once on the one GPU")
    ap.add_argument("--quality", action="store_true", help="chrF/BLEU of each best adapter (01's decoding)")
    ap.add_argument("--report-s", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--markdown", metavar="JSON", help="print a finished sweep's table as markdown, and stop")
    ap.add_argument("args", nargs="*", help="+key=value for every run; a quoted 'key=value ...' per variant")
    a = ap.parse_intermixed_args(argv)
    if a.markdown:
        return print(markdown(json.loads(Path(a.markdown).read_text())))
    if not (a.params and a.out):
        ap.error("a params file and --out are needed to run a sweep")
    if a.parallel < 1:
        ap.error("--parallel must be at least 1")
    common = paramfile.parse_changes([x for x in a.args if x.startswith("+")], params.TrainParams)
    variants = [{}] + [paramfile.parse_changes(x.split(), params.TrainParams) for x in a.args if not x.startswith("+")]
    p0 = paramfile.load(a.params)["01_finetune"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, recipes = [], {}
    for changes in variants:  # every recipe checked (types, ranges) before anything trains
        name = slug(changes)
        if name in recipes:
            raise SystemExit(f"variant {name!r} is given twice")
        recipes[name] = (changes, dataclasses.replace(p0, **{**common, **changes}))
        jobs.append((name, paramfile.dump_train(recipes[name][1], out / f"{name}.yaml"), out / name))
    doc = {"params": p0.to_dict(), "common_changes": common, "exit_codes": {}, "rows": [],
           "git": results.git_state(), "hardware": results.hardware(), "versions": results.versions()}

    def save(name=None):  # after each run: a call cut short keeps what finished
        doc["rows"] = [row(n, changes, out / n) for n, (changes, _) in recipes.items()]
        results.atomic_write(out / "recipe_sweep.json", json.dumps(doc, indent=1, default=str))

    doc["exit_codes"] = train_all(jobs, a.parallel, on_finish=save, report_s=a.report_s)
    save()
    rows = doc["rows"]
    if a.quality:
        records = data.load_split(p0.data_dir, p0.eval_split, limit=p0.eval_limit or None)
        records = records[:p0.quality_limit] if p0.quality_limit else records  # as 01 does
        for r in rows:
            if "best_ppl" in r:
                r["quality"] = adapter_quality(recipes[r["variant"]][1], out / r["variant"], records)
        results.atomic_write(out / "recipe_sweep.json", json.dumps(doc, indent=1, default=str))
    if any("curve" in r for r in rows):
        plots.save(plots.sweep_lines(report.sweep_curves(doc)), out / "recipe_sweep.png")
    t = report.sweep_table(doc)
    t["ppl vs baseline"] = t.best_ppl / t.best_ppl.iloc[0]  # row 0: the params file's own recipe
    t["s/step"] = [r.get("median_s_per_step") for r in rows]
    print(t.round(3).to_string(index=False))
    failed = [r["variant"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"not finished: {failed} (rerun the same command to resume)")


if __name__ == "__main__":
    with one_line_errors() as cli:  # a bad key=value is one line, not a traceback
        main()
    sys.exit(cli.code)
