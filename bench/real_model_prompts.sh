#!/usr/bin/env bash
# SmolLM2-135M-Instruct, greedy, on the first N held-out problems of each word-problem
# set, with the default prompt and with the few-shot prompts of bench/prompts/; prints
# one row per (set, prompt). Each evaluation's report is kept in runs/prompts/.
#   bash bench/real_model_prompts.sh [N=100]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
bash scripts/fetch-assets.sh --with-model >&2
cargo build --release -q -p cal-cli
BIN=target/release/cal-grpo
GGUF=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
run() { # set file prompt-name [--config FILE]
  local set=$1 file=$2 name=$3; shift 3
  local out=runs/prompts/$set-$name
  local t0=$(date +%s)
  $BIN eval --model $GGUF --dataset "$set:$file" --eval-samples "$N" --max-new-tokens 160 \
    --output-dir "$out" "$@" > "$out.log" 2>&1 || { echo "$set $name failed: see $out.log" >&2; return 1; }
  python3 - "$out/eval_results.json" "$set" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); a = r["accuracy"]; s = r.get("step_accuracy")
steps = "-" if s is None else f"{100 * s:.1f}%"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {100 * a['strict_accuracy']:.1f}% | {100 * a['flexible_accuracy']:.1f}% | {steps} | {sys.argv[4]} |")
PY
}
mkdir -p runs/prompts
echo "| set | prompt | strict | flexible | arithmetic steps right | wall s |"
echo "|---|---|---|---|---|---|"
for set in asdiv svamp mawps gsm-hard; do
  run $set assets/${set/-/_}/test.jsonl default
done
for set in asdiv svamp mawps; do
  run $set assets/${set/-/_}/test.jsonl few4 --config bench/prompts/few4.toml
done
run svamp assets/svamp/test.jsonl few8 --config bench/prompts/few8.toml
