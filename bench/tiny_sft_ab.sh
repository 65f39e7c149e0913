#!/usr/bin/env bash
# Two builds of cal-grpo on the tiny model's SFT (the cold experiment's first and
# longest phase), alternately in one invocation: A, B, A, B, ... each from scratch on
# the experiment's chain benchmark. Prints the median seconds per build, the spread,
# the speed-up of B over A, and the SHA-256 of the trained weights: a change meant to
# be numerically neutral must give the same hash.
#
#   cp target/release/cal-grpo /tmp/cal-grpo-a     # the build before the change
#   cargo build --release -p cal-cli               # the build after it
#   bash bench/tiny_sft_ab.sh /tmp/cal-grpo-a target/release/cal-grpo [ROUNDS=3] [SFT_STEPS=120]
set -euo pipefail
a=$1
b=$2
rounds=${3:-3}
steps=${4:-120}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
for r in $(seq "$rounds"); do
  for side in A B; do
    bin=$a
    [ "$side" = B ] && bin=$b
    rm -rf "$tmp/cache" "$tmp/run"
    line=$(CAL_GRPO_CACHE="$tmp/cache" "$bin" train --style chain --sft-steps "$steps" \
      --steps 1 --eval-every 0 --output-dir "$tmp/run" 2>&1 | grep "tiny SFT" || true)
    secs=$(sed -E 's/.* in ([0-9.]+)s.*/\1/' <<<"$line")
    hash=$(sha256sum "$tmp"/cache/tiny-*/model.safetensors | cut -c1-16)
    echo "$side $secs $hash" >> "$tmp/results"
    echo "round $r: $side ($bin): $line (weights $hash)" >&2
  done
done
python3 - "$tmp/results" "$a" "$b" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print("| build | median SFT s | spread | runs (s) | weights SHA-256 |")
print("|---|---|---|---|---|")
med = {}
for side, path in (("A", sys.argv[2]), ("B", sys.argv[3])):
    xs = [float(r[1]) for r in rows if r[0] == side]
    hashes = sorted({r[2] for r in rows if r[0] == side})
    med[side] = statistics.median(xs)
    print(f"| {side}: `{path}` | {med[side]:.1f} | {min(xs):.1f}–{max(xs):.1f} | "
          f"{', '.join(f'{x:.1f}' for x in xs)} | {', '.join(hashes)} |")
same = {r[2] for r in rows}
print(f"\nB / A time: {med['B'] / med['A']:.2f} (speed-up {med['A'] / med['B']:.2f}x); "
      f"weights {'identical' if len(same) == 1 else 'DIFFER'} across builds and rounds")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
