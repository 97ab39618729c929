"""Headless fine-tuning: python -m lib.train [PARAMS_YAML] [--out DIR] [--soup-member K] (01_finetune's parameters).

--soup-member K trains only the K-th run (0-based) of a soup (`soup_seeds` > 1) into DIR/seed-<seed>, where
the soup's 01 (with --out DIR, or the notebook) reads it back: its runs can train side by side, one
command each, before the soup is made.

Also what each process of a data-parallel run executes (lib.launch). Errors print one line (set
CCT_DEBUG=1 for the traceback); Ctrl-C prints how to resume.
"""
import argparse
import json
import sys
from pathlib import Path

from . import data, paramfile, resolve, soup
from .cli import one_line_errors
from .finetune import finetune
from .trainer import is_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file", nargs="?")
    ap.add_argument("--out", help="output folder (default: <out_dir>/01_finetune)")
    ap.add_argument("--soup-member", type=int, help="train only this run of the soup (0 = the first seed)")
    a = ap.parse_args(argv)
    with one_line_errors("run the same command again to resume from the last checkpoint") as cli:
        p = paramfile.load(a.params_file)["01_finetune"]
        out = Path(a.out) if a.out else resolve(p.out_dir) / "01_finetune"
        if a.soup_member is not None:
            members = soup.member_params(p)
            if not 0 <= a.soup_member < len(members):
                raise ValueError(f"--soup-member {a.soup_member}: the soup has runs 0..{len(members) - 1} "
                                 f"(soup_seeds: {p.soup_seeds})")
            p = members[a.soup_member]
            out = soup.member_dir(out, p)
        tr = data.load_split(p.data_dir, "train", limit=p.train_limit)
        ev = data.load_split(p.data_dir, p.eval_split, limit=p.eval_limit)
        result = finetune(p, tr, ev, out)
        if is_main():  # one summary line, not one per process
            print(json.dumps(result.summary))
    return cli.code


if __name__ == "__main__":
    sys.exit(main())
