#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time with cargo fuzz
# (libFuzzer, nightly) and prints executions, coverage and crashes per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=60] [TARGET...]
#
# Corpora grow in fuzz/corpus/<target> (ignored by git), seeded from fuzz/seeds/<target>;
# crashes land in fuzz/artifacts/<target>. Exit status 1 when any target crashed.
# Sanitizer: none (the targets are safe Rust); debug assertions stay on, so integer
# overflow is a crash too.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-60}"
shift || true
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd fuzz
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -s none
mkdir -p logs
crashed=0
rows=()
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(ls "artifacts/$t" | wc -l)
  log="logs/$t.log"
  # -timeout: one input slower than 10 s is a finding too (a hang).
  cargo +nightly fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    >"$log" 2>&1 || true
  after=$(ls "artifacts/$t" | wc -l)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$last")
  new=$((after - before))
  [ "$new" -gt 0 ] && crashed=1
  rows+=("$(printf '| %-16s | %5s | %10s | %8s | %6s | %6s | %6s | %7s |' "$t" "$SECS" "${execs:-?}" \
    "$(( ${execs:-0} / SECS ))" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$new")")
done
echo
echo "fuzz.sh: $(date -u +%F) $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| target           |     s | executions |   exec/s |  edges | features | corpus | crashes |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if [ "$crashed" = 1 ]; then
  echo "crash inputs: fuzz/artifacts/<target>/ (reproduce: cd fuzz && cargo +nightly fuzz run -s none <target> <file>)" >&2
  exit 1
fi
