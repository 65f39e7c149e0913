#!/usr/bin/env bash
# The tiny model's SFT (the cold experiment's first and longest phase) under different
# thread settings, alternately in one invocation: each round runs every setting once,
# from scratch, on the experiment's chain benchmark. Prints the median seconds per
# setting, its spread, the ratio to the first setting, and the final loss (the settings
# must not change the numbers: same loss to the last printed digit).
#
#   bash bench/tiny_sft_threads.sh [ROUNDS] [SFT_STEPS]     # defaults 3 and 120
set -euo pipefail
rounds=${1:-3}
steps=${2:-120}
cd "$(dirname "$0")/.."
cargo build --release -q -p cal-cli
bin=target/release/cal-grpo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# name|environment
settings=(
  "default (2 threads)|"
  "1 thread|RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1"
  "2 threads, no spin|CANDLE_BARRIER_POOL_SPIN_LIMIT=0"
)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
for r in $(seq "$rounds"); do
  for i in "${!settings[@]}"; do
    env_=${settings[$i]#*|}
    rm -rf "$tmp/cache" "$tmp/run"
    line=$(env $env_ CAL_GRPO_CACHE="$tmp/cache" "$bin" train --style chain --sft-steps "$steps" \
      --steps 1 --eval-every 0 --output-dir "$tmp/run" 2>&1 | grep "tiny SFT" || true)
    secs=$(sed -E 's/.* in ([0-9.]+)s.*/\1/' <<<"$line")
    loss=$(sed -E 's/.*→ ([0-9.]+).*/\1/' <<<"$line")
    echo "$i $secs $loss" >> "$tmp/results"
    echo "round $r: ${settings[$i]%%|*}: $line" >&2
  done
done
python3 - "$tmp/results" "${settings[@]}" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
names = [s.split("|")[0] for s in sys.argv[2:]]
base = None
print("| setting | median SFT s | spread | vs first | final loss |")
print("|---|---|---|---|---|")
for i, name in enumerate(names):
    xs = [float(r[1]) for r in rows if int(r[0]) == i]
    losses = sorted({r[2] for r in rows if int(r[0]) == i})
    med = statistics.median(xs)
    base = base or med
    print(f"| {name} | {med:.0f} | {min(xs):.0f}–{max(xs):.0f} | {base / med:.2f}x | {', '.join(losses)} |")
EOF
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
