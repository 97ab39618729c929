"""Translation quality of one fine-tuned adapter under several decoding settings, in one run: chrF and
character BLEU per direction on the eval split (settings chosen on the public test, as the seed did).

    python benchmarks/decode_sweep.py params/study.yaml --run reports/study-gpu/01_finetune \
        num_beams=4 repetition_penalty=1.1 "num_beams=4 repetition_penalty=1.1" --json out.json

Each setting is a space-separated list of key=value changes of 01's decoding parameters (GenerateParams);
the first row is always 01's own setting (greedy by default), so every ratio has its baseline in the
same run. The adapter is `<run>/best_adapter` unless --adapter names another.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, run from anywhere
from lib import data, generate, paramfile, params, quality, results, trainable  # noqa: E402
from lib.cli import one_line_errors  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params")
    ap.add_argument("--run", required=True, help="01's run folder (holds best_adapter/)")
    ap.add_argument("--adapter", default="best_adapter")
    ap.add_argument("--limit", type=int, default=0, help="the first N eval records (0 = all)")
    ap.add_argument("--json")
    ap.add_argument("settings", nargs="*")
    a = ap.parse_intermixed_args(argv)
    p = paramfile.load(a.params)["01_finetune"]
    changes = [{}] + [paramfile.parse_changes(s.split(), params.GenerateParams) for s in a.settings]
    for c in changes:
        dataclasses.replace(p, **c).check()  # a bad value fails before the model loads
    records = data.load_split(p.data_dir, p.eval_split, limit=a.limit or None)
    model, tok = trainable.load_adapted(p, Path(a.run) / a.adapter)
    rows, answers_by = [], {}
    provenance = {"git": results.git_state(), "hardware": results.hardware(), "versions": results.versions(),
                  "params": p.to_dict()}
    for c in changes:
        g = dataclasses.replace(p, **c)
        t = time.perf_counter()
        answers = generate.translate(model, tok, records, g, progress=False)
        secs = time.perf_counter() - t
        name = " ".join(f"{k}={v}" for k, v in c.items()) or "01's own"
        scores = quality.by_direction(records, answers).to_dict("records")
        rows += [{"setting": name, **c, **s, "generate_s": round(secs, 1)} for s in scores]
        answers_by[name] = answers
        whole = scores[0]  # direction "all"
        print(f"{name:40s} chrF {whole['chrF']:.2f}  BLEU {whole['BLEU']:.2f}  ({secs:.0f} s)", flush=True)
        if a.json:  # after every setting: a call cut during the next keeps this one (one was lost so)
            doc = {"run": str(a.run), "adapter": a.adapter, "n": len(records), "rows": rows, "answers": answers_by,
                   **provenance}
            Path(a.json).write_text(json.dumps(doc, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    with one_line_errors() as cli:  # a bad key=value is one line, not a traceback
        main()
    sys.exit(cli.code)
