#!/usr/bin/env bash
# GRPO against CAL-GRPO on a real model and real data, on 2 cores: SmolLM2-135M-Instruct
# on SVAMP from an SFT warm start (60 LoRA steps on SVAMP's training part), then per
# seed three arms: outcome GRPO, CAL with the reference oracle (SVAMP's equations) and
# CAL with the calculator. The baseline never asks the oracle, so the calculator run
# reuses the reference run's "before RL" evaluation and finished baseline arms and
# trains only its CAL arms. Every folder resumes: rerun the script after a kill.
#
#   bash bench/real_model_rl.sh                    # 3 seeds into runs/real-model
#   SEEDS=5 STEPS=24 OUT=runs/rm5 bash bench/real_model_rl.sh
#   # sized for a GPU (see docs/real-model.md):
#   EXTRA="--device cuda --dtype bf16" SEEDS=5 STEPS=300 PROMPTS=16 EVAL_EVERY=25 \
#     SFT_STEPS=200 OUT=runs/real-model-gpu SFT=runs/smollm2-svamp-sft-gpu bash bench/real_model_rl.sh
#
# Measured on 2 cores: see docs/real-model.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/reuse_baseline.sh
bin=${CAL_GRPO:-target/release/cal-grpo}
out=${OUT:-runs/real-model}
gguf=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
data=svamp:assets/svamp/test.jsonl
sft=${SFT:-runs/smollm2-svamp-sft}
read -r -a extra <<<"${EXTRA:-}"
[ -f "$gguf" ] || bash scripts/fetch-assets.sh --with-model >&2
mkdir -p "$out"

if [ ! -f "$sft/model.safetensors" ]; then
    echo "== SFT warm start -> $sft ($(date +%H:%M:%S))"
    "$bin" sft --model "$gguf" --dataset "$data" --steps "${SFT_STEPS:-60}" --batch-size 8 \
        --learning-rate 1e-4 --lora-rank 16 "${extra[@]}" --output-dir "$sft"
fi

common=(--model "$sft" --dataset "$data" --lora-rank 16 --learning-rate "${LR:-1e-4}"
    --prompts-per-step "${PROMPTS:-4}" --num-generations "${GENERATIONS:-8}"
    --max-new-tokens "${MAX_NEW_TOKENS:-64}" --temperature "${TEMPERATURE:-0.7}"
    --steps "${STEPS:-12}" --eval-every "${EVAL_EVERY:-6}" --eval-samples "${EVAL_SAMPLES:-300}"
    --seeds "${SEEDS:-3}" --jobs "${JOBS:-2}" "${extra[@]}")

for oracle in reference calculator; do
    dir=$out/$oracle
    [ "$oracle" = reference ] || reuse_baseline "$out/reference" "$dir"
    echo "== $oracle -> $dir ($(date +%H:%M:%S))"
    t0=$SECONDS
    "$bin" experiment "${common[@]}" --api-provider "$oracle" --output-dir "$dir"
    echo "== $oracle: $((SECONDS - t0)) s"
done
"$bin" summarize "$out/reference" "$out/calculator" --curves "$out/eval_curves.png" |
    tee "$out/summary.md"
