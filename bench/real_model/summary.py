"""The real-model study's final table (bench/real_model_study.sh writes its inputs).

Reads OUT/final/<start | calculator-seed-S-ARM | reference-seed-S-cal>/{heldout,svamp,asdiv}/
eval_results.json and the arms' held-out curves (metrics.jsonl), and prints, per arm:
held-out accuracy (mean over seeds), its gain over the start and CAL − GRPO paired by
seed, each with a 95% t interval over seeds, written `+X.X [+a, +b]` in points; the
transfer to SVAMP and ASDiv; and the sample-efficiency ratio (the first curve point
where CAL's mean reaches GRPO's final mean, over GRPO's steps).

    python3 bench/real_model/summary.py runs/real-model-study
"""
import json
import math
import statistics
import sys
from pathlib import Path

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def acc(path):
    return 100.0 * json.loads(path.read_text())["accuracy"]["accuracy"]


def interval(xs):
    """Mean and 95% t interval in points; a single value has none."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return f"{m:+.1f} (1 seed)"
    h = T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}]"


def curve(arm_dir):
    rows = [json.loads(l) for l in (arm_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: 100.0 * r["eval/accuracy"] for r in rows if "eval/accuracy" in r}


def main(out):
    out = Path(out)
    final = out / "final"
    start = {s: acc(final / "start" / s / "eval_results.json") for s in ("heldout", "svamp", "asdiv")}
    arms = {}  # (oracle, arm) -> {seed: {set: acc}}
    for d in sorted(final.glob("*-seed-*-*")):
        oracle, rest = d.name.split("-seed-", 1)
        seed, arm = rest.split("-", 1)
        sets = {s: acc(d / s / "eval_results.json") for s in start if (d / s / "eval_results.json").exists()}
        if len(sets) == len(start):
            arms.setdefault((oracle, arm), {})[seed] = sets
    sweep = sorted(p for p in (out / "sweep").glob("*") if (p / "metrics.jsonl").exists())
    if sweep:
        print("\nThe sweep (GRPO, one seed; held-out curve set):\n")
        print("| point | flags | curve (step: accuracy) |")
        print("|---|---|---|")
        for p in sweep:
            c = curve(p)
            flags = next((l.split(None, 1)[1].strip() for l in Path("bench/real_model/sweep.txt").read_text().splitlines()
                          if l.split(None, 1)[:1] == [p.name]), "")
            print(f"| {p.name} | `{flags}` | " + ", ".join(f"{t}: {a:.1f}%" for t, a in sorted(c.items())) + " |")
    n_held = json.loads((final / "start" / "heldout" / "eval_results.json").read_text())["accuracy"]["total"]
    print(f"\nFinal evaluation of each arm's last checkpoint ({n_held} held-out problems; "
          "SVAMP and ASDiv: 300 held-out each); means over seeds, 95% t intervals in points.\n")
    print("| arm | seeds | held-out | − start | CAL − GRPO | SVAMP | ASDiv |")
    print("|---|---|---|---|---|---|---|")
    print(f"| start (SFT) | | {start['heldout']:.1f}% | | | {start['svamp']:.1f}% | {start['asdiv']:.1f}% |")
    grpo = arms.get(("calculator", "baseline"), {})
    names = {("calculator", "baseline"): "GRPO", ("calculator", "cal"): "CAL-GRPO, calculator",
             ("reference", "cal"): "CAL-GRPO, reference oracle"}
    for key, label in names.items():
        runs = arms.get(key)
        if not runs:
            continue
        seeds = sorted(runs)
        held = [runs[s]["heldout"] for s in seeds]
        gain = interval([h - start["heldout"] for h in held])
        diff = ""
        if key != ("calculator", "baseline"):
            paired = [runs[s]["heldout"] - grpo[s]["heldout"] for s in seeds if s in grpo]
            diff = interval(paired) if paired else ""
        sv = statistics.mean(runs[s]["svamp"] for s in seeds)
        ad = statistics.mean(runs[s]["asdiv"] for s in seeds)
        print(f"| {label} | {', '.join(seeds)} | {statistics.mean(held):.1f}% | {gain} | {diff} | "
              f"{sv:.1f}% | {ad:.1f}% |")
    # sample efficiency on the curves of the calculator experiment
    base = [curve(p) for p in sorted((out / "calculator").glob("seed-*/baseline"))]
    cal = [curve(p) for p in sorted((out / "calculator").glob("seed-*/cal"))]
    if base and cal:
        steps = sorted(set.intersection(*(set(c) for c in base + cal)))
        mean = lambda cs, t: statistics.mean(c[t] for c in cs)  # noqa: E731
        target = mean(base, steps[-1])
        reach = next((t for t in steps if mean(cal, t) >= target), None)
        print(f"\nSample efficiency (held-out curves, calculator experiment): GRPO ends at "
              f"{target:.1f}% after {steps[-1]} steps; CAL's mean first reaches it at "
              + (f"step {reach} ({reach / steps[-1]:.2f}× GRPO's steps)." if reach is not None
                 else "no curve point (it stays below)."))


if __name__ == "__main__":
    main(sys.argv[1])
