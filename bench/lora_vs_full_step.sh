#!/usr/bin/env bash
# The RL step's time and memory with LoRA (rank 16) against full fine-tuning, on
# SmolLM2-135M from the SVAMP warm start (bench/real_model_rl.sh makes it): CAL with the
# reference oracle, 4 prompts × 8 generations, 2 steps per run, the two taking turns
# ROUNDS times. Prints one row per run: the step times and where they went.
#   bash bench/lora_vs_full_step.sh [ROUNDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
sft=${SFT:-runs/smollm2-svamp-sft}
out=runs/lora-vs-full
mkdir -p "$out"
echo "| run | step s | generate s | reference pass s | oracle wait s | update s | peak RSS GiB |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "${1:-2}"); do
    for rank in 16 0; do
        dir=$out/rank$rank-$round
        /usr/bin/time -f "%M" -o "$dir.rss" "$bin" train --model "$sft" \
            --dataset svamp:assets/svamp/test.jsonl --prompts-per-step 4 --num-generations 8 \
            --max-new-tokens 64 --steps 2 --eval-samples 10 --api-provider reference --use-cal \
            --lora-rank "$rank" --overwrite --output-dir "$dir" > "$dir.log" 2>&1
        python3 - "$dir" "$rank" "$(cat "$dir.rss")" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in rows if "perf/step_seconds" in r]
col = lambda k: " / ".join(f"{r[k]:.1f}" for r in steps)
name = "full" if sys.argv[2] == "0" else f"LoRA {sys.argv[2]}"
print(f"| {name} | {col('perf/step_seconds')} | {col('perf/generate_seconds')} | "
      f"{col('perf/fixed_logprob_seconds')} | {col('perf/oracle_wait_seconds')} | "
      f"{col('perf/update_seconds')} | {int(sys.argv[3]) / 2**20:.2f} |")
PY
    done
done
