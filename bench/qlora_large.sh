#!/usr/bin/env bash
# One QLoRA SFT step on random-weight models of large shapes (Qwen2.5-1.5B's and 7B's,
# bench/configs/): the base drawn straight into q4_0 a layer at a time (its f32 weights
# never exist at once: 28 GB for the 7B shape), LoRA rank 16 on every projection, one
# generated problem per step. Prints each run's peak resident memory and wall time
# (/usr/bin/time: load, the step and the adapter's export) and the step's own seconds.
#
#   cargo build --release -p cal-cli
#   bash bench/qlora_large.sh [SHAPES="qwen2.5-1.5b qwen2.5-7b"] [STEPS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
shapes=${1:-qwen2.5-1.5b qwen2.5-7b}
steps=${2:-2}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(free -g | awk '/Mem:/ {print $2}') GiB"
for s in $shapes; do
    dir=$(mktemp -d /tmp/qlora-large.XXXX)
    /usr/bin/time -f "$s: peak %M KiB, wall %e s" "$bin" sft --model "random:bench/configs/$s.json" \
        --dataset generated --num-samples 8 --steps "$steps" --batch-size 1 --lora-rank 16 \
        --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
        --quantize-base q4_0 --save-every 0 --no-export --output-dir "$dir/run" 2>&1 |
        grep -E "peak|error"
    python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if 'perf/step_seconds' in l]
print('  step seconds', [round(r['perf/step_seconds'], 1) for r in rows])" "$dir/run/metrics.jsonl"
    rm -rf "$dir"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
