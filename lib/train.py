"""Headless fine-tuning: python -m lib.train [PARAMS_YAML] [--out DIR] (01_finetune's parameters).

Also what each process of a data-parallel run executes (lib.launch). Errors print one line (set
CCT_DEBUG=1 for the traceback); Ctrl-C prints how to resume.
"""
import argparse
import json
import sys
from pathlib import Path

from . import data, paramfile, resolve
from .cli import one_line_errors
from .finetune import finetune
from .trainer import is_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file", nargs="?")
    ap.add_argument("--out", help="output folder (default: <out_dir>/01_finetune)")
    a = ap.parse_args(argv)
    with one_line_errors("run the same command again to resume from the last checkpoint") as cli:
        p = paramfile.load(a.params_file)["01_finetune"]
        out = Path(a.out) if a.out else resolve(p.out_dir) / "01_finetune"
        tr = data.load_split(p.data_dir, "train", limit=p.train_limit)
        ev = data.load_split(p.data_dir, p.eval_split, limit=p.eval_limit)
        result = finetune(p, tr, ev, out)
        if is_main():  # one summary line, not one per process
            print(json.dumps(result.summary))
    return cli.code


if __name__ == "__main__":
    sys.exit(main())
