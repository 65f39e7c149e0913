#!/usr/bin/env bash
# Two builds of cal-grpo on one model's training step (forward + backward + AdamW on
# 8 x 256 tokens) and batch-8 generation, via `cal-grpo bench model --repeats 1`,
# ALTERNATELY in one invocation: A, B, A, B, ... Prints medians, every run and the
# ratio B / A. Default model: SmolLM2-135M's shape with random weights (no download).
#
#   cp target/release/cal-grpo /tmp/cal-grpo-a     # the build before the change
#   cargo build --release -p cal-cli               # the build after it
#   bash bench/step_ab.sh /tmp/cal-grpo-a target/release/cal-grpo [ROUNDS=3] [MODEL]
set -euo pipefail
a=$1
b=$2
rounds=${3:-3}
model=${4:-random:bench/configs/smollm2-135m.json}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
before=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$rounds"); do
  for side in A B; do
    bin=$a
    [ "$side" = B ] && bin=$b
    # | model | params | gen tok/s | train step (s) | train GFLOP/s | ref pass (s) | matmul GFLOP/s | ...
    row=$("$bin" bench model --model "$model" --repeats 1 --seq 256 --new-tokens 128 --batch 8 2>/dev/null \
      | grep -E '^\| [^m-]' | grep -v '^| model' | tail -1)
    echo "$side $row" >> "$tmp/rows"
    echo "round $r: $side ($bin): $row" >&2
  done
done
python3 - "$tmp/rows" "$a" "$b" "$before" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import statistics, sys
rows = {"A": [], "B": []}
for line in open(sys.argv[1]):
    side, rest = line.split(" ", 1)
    cells = [c.strip() for c in rest.strip().strip("|").split("|")]
    rows[side].append((float(cells[2]), float(cells[3]), float(cells[5]), float(cells[6])))
med = statistics.median
print("| build | train step s (median; runs) | ref pass s | gen tok/s (batch 8) | matmul GFLOP/s |")
print("|---|---|---|---|---|")
for side, path in (("A", sys.argv[2]), ("B", sys.argv[3])):
    r = rows[side]
    steps = [x[1] for x in r]
    print(f"| {side}: `{path}` | {med(steps):.2f} ({', '.join(f'{s:.2f}' for s in steps)}) | "
          f"{med([x[2] for x in r]):.2f} | {med([x[0] for x in r]):.1f} | {med([x[3] for x in r]):.0f} |")
sa, sb = med([x[1] for x in rows["A"]]), med([x[1] for x in rows["B"]])
print(f"\ntraining step B / A: {sb / sa:.2f} (speed-up {sa / sb:.2f}x); {len(rows['A'])} alternating rounds; "
      f"load average before: {sys.argv[4]}, after: {sys.argv[5]}")
PY
