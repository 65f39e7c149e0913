#!/usr/bin/env bash
# The default experiment with local rollouts against the same with `--rollout-engine
# vllm` (a managed server), alternately, on a warm cache (the tiny policy already
# trained, so only "before RL", the arms and the comparison are timed; the vLLM side
# includes its server's start-up). Prints each run's wall time and summary row.
#
#   bash bench/vllm_experiment_ab.sh [ROUNDS] [extra experiment flags...]   # default 1
set -euo pipefail
rounds=${1:-1}
shift $(($# < 1 ? $# : 1))
cd "$(dirname "$0")/.."
cargo build --release -q -p cal-cli
bin=target/release/cal-grpo
export CAL_VLLM_PYTHON=${CAL_VLLM_PYTHON:-$(bash scripts/install-vllm.sh)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin" experiment --steps 1 --eval-samples 2 --output-dir "$tmp/warm" "$@" > /dev/null 2>&1 # the SFT cache
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
echo "| round | rollouts | wall s | before RL | baseline | CAL |"
echo "|---|---|---|---|---|---|"
for r in $(seq "$rounds"); do
  for engine in local vllm; do
    out="$tmp/r$r-$engine"
    t0=$(date +%s.%N)
    "$bin" experiment --rollout-engine "$engine" --output-dir "$out" "$@" > "$out.log" 2>&1 || {
      tail -20 "$out.log"
      exit 1
    }
    t=$(echo "$(date +%s.%N) - $t0" | bc)
    row=$(sed -n 3p "$out/summary.md" | cut -d'|' -f3-5)
    echo "| $r | $engine | ${t%.*} |$row|"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
