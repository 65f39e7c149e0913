#!/usr/bin/env bash
# The experiment's arms one after another in one process (`--jobs 1`) against two at
# once in child processes (`--jobs 2`), alternately, on a warm cache (the tiny policy
# already trained), so only the RL phase is timed. Checks that both give the same
# summary table, and prints median wall times, spreads and the ratio.
#
#   bash bench/experiment_jobs_ab.sh CACHE_DIR [ROUNDS] [extra experiment flags...]
set -euo pipefail
cache=$1
rounds=${2:-2}
shift $(($# < 2 ? $# : 2))
cd "$(dirname "$0")/.."
bin=${CAL_GRPO_BIN:-target/release/cal-grpo}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $bin"
for r in $(seq "$rounds"); do
  for jobs in 1 2; do
    out="$tmp/r$r-j$jobs"
    t0=$(date +%s.%N)
    CAL_GRPO_CACHE="$cache" "$bin" experiment --jobs "$jobs" --output-dir "$out" "$@" > "$out.log" 2>&1 || {
      tail -20 "$out.log"
      exit 1
    }
    t=$(echo "$(date +%s.%N) - $t0" | bc)
    echo "$jobs $t" >> "$tmp/times"
    echo "round $r, --jobs $jobs: ${t%.*} s" >&2
    head -3 "$out/summary.md" | tail -1 > "$out.table"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
tables=$(cat "$tmp"/*.table | sort -u | wc -l)
echo "distinct result rows over all runs: $tables (1 = every run gave the same table)"
cat "$tmp"/r1-j1.table
python3 - "$tmp/times" <<'PY'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    j, s = line.split()
    t.setdefault(j, []).append(float(s))
print("| arms | median wall s | runs (s) |\n|---|---|---|")
for j, name in (("1", "one after another (--jobs 1)"), ("2", "two at once (--jobs 2)")):
    print(f"| {name} | {statistics.median(t[j]):.0f} | {', '.join(f'{x:.0f}' for x in t[j])} |")
print(f"\n--jobs 2 / --jobs 1 speed: {statistics.median(t['1']) / statistics.median(t['2']):.2f}x")
PY
