#!/usr/bin/env bash
# The real-data recipe at the size 2 CPU cores allow: SmolLM2-135M-
# Instruct, held-out GSM8K accuracy on a fixed subset (the first EVAL test problems)
# before and after SFT on GSM8K train, then baseline GRPO vs CAL from the SFT
# checkpoint. Each phase's wall time is printed. For a GPU, raise the numbers (the long-run commands are
# in docs/results.md, "Real data").
#
#   bash scripts/fetch-assets.sh --with-model
#   bash bench/smollm2_recipe.sh [SFT_STEPS] [EVAL] [RL_STEPS]      # defaults 40, 50, 4
set -euo pipefail
sft_steps=${1:-40}
n_eval=${2:-50}
rl_steps=${3:-4}
cd "$(dirname "$0")/.."
cargo build --release -q -p cal-cli
bin=target/release/cal-grpo
gguf=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=runs/smollm2-recipe
mkdir -p "$out"
phase() { local t0=$SECONDS; "$@"; echo "[$((SECONDS - t0)) s] $*" >&2; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
phase "$bin" eval --model "$gguf" --dataset assets/gsm8k/test.jsonl --eval-samples "$n_eval" \
    --max-new-tokens 256 --output-dir "$out/eval-before"
phase "$bin" sft --model "$gguf" --dataset assets/gsm8k/train.jsonl --steps "$sft_steps" \
    --batch-size 8 --learning-rate 2e-5 --output-dir "$out/sft-model"
phase "$bin" eval --model "$out/sft-model" --dataset assets/gsm8k/test.jsonl --eval-samples "$n_eval" \
    --max-new-tokens 256 --output-dir "$out/eval-after"
phase "$bin" experiment 16 4 --model "$out/sft-model" --dataset assets/gsm8k/train.jsonl \
    --eval-dataset assets/gsm8k/test.jsonl --eval-samples "$n_eval" --prompts-per-step 4 \
    --max-new-tokens 128 --steps "$rl_steps" --micro-batch 0 --micro-batch-tokens 1024 \
    --output-dir "$out/rl"
"$bin" compare "$out/eval-before" "$out/eval-after" | head -12
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
