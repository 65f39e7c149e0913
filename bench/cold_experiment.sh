#!/usr/bin/env bash
# The README's first command on a cold cache, timed: `cal-grpo experiment` with
# CAL_GRPO_CACHE and the output folder both fresh and empty, so the tokenizer and the
# tiny policy's SFT run from scratch. Prints the wall time, the SFT's share, the peak
# RSS, the result table and the load average before and after (this VM is shared).
#
#   cargo build --release -p cal-cli
#   bash bench/cold_experiment.sh [extra experiment flags...]
#
# KEEP_CACHE=DIR copies the fresh cache (the trained tiny policy) to DIR afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO_BIN:-target/release/cal-grpo}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $bin"
CAL_GRPO_CACHE="$tmp/cache" /usr/bin/time -v -o "$tmp/time" \
  "$bin" experiment --output-dir "$tmp/out" "$@" > "$tmp/log" 2>&1 || {
  tail -20 "$tmp/log"
  exit 1
}
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep "tiny SFT" "$tmp/log" || true
grep -E "Elapsed \(wall clock\)|Maximum resident" "$tmp/time"
head -8 "$tmp/out/summary.md"
if [ -n "${KEEP_CACHE:-}" ]; then
  rm -rf "$KEEP_CACHE" && cp -r "$tmp/cache" "$KEEP_CACHE"
fi
