#!/usr/bin/env bash
# The noise map: how much of CAL's gain over outcome GRPO survives a worse first-error
# oracle. At K = 4 from the mixed warm start (where the reference oracle let CAL win),
# the reference oracle is degraded with --oracle-noise, one experiment folder per level,
# SEEDS seeds each, 1000 held-out problems. The baseline never asks the oracle, so every
# level reuses the noise-free folder's finished baseline arms (an experiment reuses a
# finished arm) and trains only its CAL arms. Then `summarize --bench-labels` runs each
# folder's own oracle over planted K = 4 chains for the x axis and draws the map.
#
#   bash bench/noise_map.sh                  # 3 seeds into runs/noise-map
#   SEEDS=5 OUT=runs/noise-map5 LEVELS="none miss=0.25" bash bench/noise_map.sh
#
# Measured on 2 cores: see docs/oracle-bench.md. Rerunning resumes: finished arms are
# kept, an interrupted one continues from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/reuse_baseline.sh
bin=${CAL_GRPO:-target/release/cal-grpo}
out=${OUT:-runs/noise-map}
seeds=${SEEDS:-3}
read -r -a levels <<<"${LEVELS:-none miss=0.5 shift=0.5 random=0.5 shift=1 random=1}"
common=(--sft-chain-steps 2-6 --chain-steps 4 --seeds "$seeds" --api-provider reference
    --eval-samples 1000)
mkdir -p "$out"

folder() { [ "$1" = none ] && echo "$out/none" || echo "$out/${1//[=,]/-}"; }

for level in "${levels[@]}"; do
    dir=$(folder "$level")
    if [ "$level" != none ]; then
        [ -d "$out/none" ] || { echo "noise_map.sh: run the level none first" >&2; exit 1; }
        reuse_baseline "$out/none" "$dir"
        noise=(--oracle-noise "$level")
    else
        noise=()
    fi
    echo "== $level -> $dir ($(date +%H:%M:%S))"
    t0=$SECONDS
    "$bin" experiment "${common[@]}" "${noise[@]}" --output-dir "$dir"
    echo "== $level: $((SECONDS - t0)) s"
done

labels=$out/chains-k4-planted.jsonl
[ -f "$labels" ] || "$bin" plant-errors --dataset generated --chain-steps 4 --n 1000 --output "$labels"
dirs=()
for level in "${levels[@]}"; do dirs+=("$(folder "$level")"); done
"$bin" summarize "${dirs[@]}" --bench-labels "$labels" --plot "$out/noise-map.png" | tee "$out/noise-map.md"
