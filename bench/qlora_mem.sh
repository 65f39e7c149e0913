#!/usr/bin/env bash
# LoRA against QLoRA (--quantize-base q4_0, and keep: the GGUF's own Q4_1 blocks) on
# SmolLM2-135M-Instruct, taking turns:
# 3 SFT steps of 4 problems, LoRA rank 16 on q,k,v,o; each run's peak resident memory
# (/usr/bin/time, load and export included) and its step times. STEP=grpo times GRPO
# steps instead: 2 steps of 1 prompt x 8 generations of up to 96 new tokens (generation,
# the reference pass and the update all on the base as held), one held-out problem.
#
#   bash bench/qlora_mem.sh [ROUNDS=2] [DATASET=runs/real-model-study/data/sft.jsonl]
#   STEP=grpo bash bench/qlora_mem.sh 2 runs/real-model-study/data/rl.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
data=${2:-runs/real-model-study/data/sft.jsonl}
bin=${CAL_GRPO:-target/release/cal-grpo}
gguf=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  for q in ${QUANT:-none q4_0 keep}; do
    dir=$(mktemp -d /tmp/qlora-mem.XXXX)
    if [ "${STEP:-sft}" = grpo ]; then
      step=(train --steps 2 --prompts-per-step 1 --num-generations 8 --max-new-tokens 96
        --eval-samples 1)
    else
      step=(sft --steps 3 --batch-size 4)
    fi
    /usr/bin/time -f "$q round $r: peak %M KiB, wall %e s" "$bin" "${step[@]}" --model "$gguf" --dataset "$data" \
      --lora-rank 16 --quantize-base "$q" --save-every 0 \
      --output-dir "$dir/run" 2>&1 | grep -E "peak"
    python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if 'perf/step_seconds' in l]
print('  step seconds', [round(r['perf/step_seconds'], 1) for r in rows])" "$dir/run/metrics.jsonl"
    rm -rf "$dir"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
