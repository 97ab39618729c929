"""Summarize a py-spy raw (collapsed-stack) file, as train_speed.py --pyspy writes it: the share of
samples in each function (inclusive) and on each line (self).

    python benchmarks/stacks.py spy.1.txt [--top 40]
"""
import argparse
import re
from collections import Counter


def summarize(path):
    inclusive, self_time, total = Counter(), Counter(), 0
    for line in open(path, encoding="utf-8"):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        n, frames = int(n), stack.split(";")
        total += n
        self_time[frames[-1]] += n
        for f in {re.sub(r":\d+\)", ")", f) for f in frames}:  # a function once per sample, whatever the line
            inclusive[f] += n
    return total, inclusive, self_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    total, inclusive, self_time = summarize(a.path)
    print(f"{total} samples (all threads: the autograd engine runs backward on its own thread)")
    for title, counts in (("inclusive", inclusive), ("self", self_time)):
        print(f"-- {title}")
        for k, v in counts.most_common(a.top):
            print(f"{100 * v / total:6.1f}%  {k[:150]}")


if __name__ == "__main__":
    main()
