#!/usr/bin/env bash
# Data parallel against one process on the same machine and the same run, alternately:
# A = one process with all cores' threads, B = `mpirun -np N` with cores/N threads each.
# Both sample per group (`--rollout-seeds group`, what N ranks force), so they train on
# the same completions: the script checks that every step's rewards are equal. Prints
# the wall seconds of each round, the medians, B's speed-up, and the load average.
#
#   cargo build --release -p cal-cli --features mpi
#   bash bench/data_parallel.sh [ROUNDS=3] [STEPS=20] [RANKS=2] [EXTRA="--use-cal"]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
rounds=${1:-3}
steps=${2:-20}
ranks=${3:-2}
read -r -a extra <<<"${4:-}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export CAL_GRPO_CACHE=${CAL_GRPO_CACHE:-$tmp/cache}
run=(train --steps "$steps" --prompts-per-step 8 --num-generations 4 --eval-every 0
    --eval-samples 8 --rollout-seeds group "${extra[@]}")
# the warm start, once, outside the timing
"$bin" train --steps 0 --eval-samples 1 --output-dir "$tmp/warm" >/dev/null 2>&1 || true
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $ranks ranks"
secs() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}
for r in $(seq "$rounds"); do
    rm -rf "$tmp/a" "$tmp/b"
    a=$(secs "$bin" "${run[@]}" --output-dir "$tmp/a")
    b=$(secs mpirun -np "$ranks" --oversubscribe "$bin" "${run[@]}" --output-dir "$tmp/b")
    same=$(python3 - "$tmp/a/metrics.jsonl" "$tmp/b/metrics.jsonl" <<'PY'
import json, sys
rows = [[json.loads(l) for l in open(p)] for p in sys.argv[1:]]
keys = ["reward/accuracy", "reward/mean", "completion/mean_length"]
print("yes" if all(x[k] == y[k] for x, y in zip(*rows) for k in keys) else "NO")
PY
)
    echo "round $r: one process ${a}s, $ranks ranks ${b}s, same rewards: $same"
    echo "$a $b" >>"$tmp/times"
done
python3 - "$tmp/times" "$ranks" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
a, b = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
ratios = sorted(r[0] / r[1] for r in rows)
print(f"| run | median s | runs (s) |\n|---|---|---|")
print(f"| one process | {a:.1f} | {', '.join(f'{r[0]:.1f}' for r in rows)} |")
print(f"| {sys.argv[2]} ranks | {b:.1f} | {', '.join(f'{r[1]:.1f}' for r in rows)} |")
print(f"\nspeed-up of the ranks: {a / b:.2f}x (pair by pair {ratios[0]:.2f}-{ratios[-1]:.2f})")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
