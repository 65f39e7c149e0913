#!/usr/bin/env python3
"""The README's K-map table from finished `experiment` folders (standard library only).

    python3 scripts/kmap.py runs/k2 runs/study runs/k4 runs/k6

One row per folder: K (from its config.toml), seeds, held-out accuracy and the share of
arithmetic steps right before RL, the gains of each arm over the start and CAL − baseline
(means over seeds with 95% t intervals, in points), the steps right at the last
evaluation in each arm, and the range of the all-wrong group fraction.
"""
import json
import math
import pathlib
import re
import statistics
import sys

# two-sided 95% t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
        8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df):
    # a df missing from the table takes the next smaller one's (wider) quantile
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def mean_ci(xs):
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    h = t_quantile(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - h, m + h


def fmt(xs):
    m, lo, hi = mean_ci(xs)
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]".replace("-", "−")


def last_step_accuracy(metrics):
    last = None
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "eval/step_accuracy" in row:
            last = row["eval/step_accuracy"]
    if last is None:
        sys.exit(f"{metrics}: no eval/step_accuracy line")
    return last


def row(folder):
    folder = pathlib.Path(folder)
    cfg = (folder / "config.toml").read_text()
    k = re.search(r'^\[data\][^\[]*?^steps = (\d+)', cfg, re.M | re.S)
    summary = json.loads((folder / "summary.json").read_text())
    before = json.loads((folder / "before" / "eval_results.json").read_text())
    pts = lambda a, b: [100 * (s[a] - s[b]) for s in summary]  # noqa: E731
    steps = {arm: [100 * last_step_accuracy(folder / f"seed-{s['seed']}" / arm / "metrics.jsonl")
                   for s in summary] for arm in ("baseline", "cal")}
    d_steps = [c - b for b, c in zip(steps["baseline"], steps["cal"])]
    wrong = {arm: [s[f"{arm}_all_wrong_frac"] for s in summary] for arm in ("baseline", "cal")}
    return "| {} | {} | {:.1f}% ({:.1f}%) | {} | {} | {} | {:.1f} / {:.1f}% ({}) | {:.2f}–{:.2f} / {:.2f}–{:.2f} |".format(
        k.group(1) if k else "?", len(summary), 100 * summary[0]["before"],
        100 * before["step_accuracy"], fmt(pts("baseline", "before")), fmt(pts("cal", "before")),
        fmt(pts("cal", "baseline")), statistics.fmean(steps["baseline"]),
        statistics.fmean(steps["cal"]), fmt(d_steps), min(wrong["baseline"]),
        max(wrong["baseline"]), min(wrong["cal"]), max(wrong["cal"]))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| K | seeds | before RL (steps right) | baseline − before | CAL − before "
          "| CAL − baseline (95% t CI) | steps right at the end, base / CAL (CAL − base) "
          "| all-wrong groups (base / CAL) |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in sys.argv[1:]:
        print(row(folder))


if __name__ == "__main__":
    main()
