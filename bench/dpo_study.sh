#!/usr/bin/env bash
# Offline DPO of SmolLM2-135M-Instruct (LoRA) on pairs made from GSM8K's training
# solutions (the reference solution chosen, one step corrupted and carried forward
# rejected), full credit against first-error credit: held-out pair accuracy, and greedy
# accuracy on 300 held-out problems each of GSM8K (its test split) and SVAMP, before
# and after. Results: docs/preferences.md.
#
# Every stage resumes: rerun after a kill (finished stages are skipped, a DPO run with
# checkpoints continues from them). Run it in the background:
#
#   cargo build --release -p cal-cli && bash scripts/fetch-assets.sh --with-model
#   nohup bash bench/dpo_study.sh > runs/dpo-study.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
out=${OUT:-runs/dpo-study}
gguf=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
steps=${STEPS:-60}
stamp() { echo "== $* ($(date +%H:%M:%S))"; }
[ -f "$gguf" ] || bash scripts/fetch-assets.sh --with-model >&2
mkdir -p "$out"
source bench/resume_if.sh

if [ ! -f "$out/pairs.jsonl" ]; then
    stamp "pairs -> $out/pairs.jsonl"
    "$bin" plant-errors --dataset assets/gsm8k/train.jsonl --n 1200 --correct-share 0 --seed 0 \
        -o "$out/labels.jsonl"
    "$bin" make-pairs --labels "$out/labels.jsonl" --chat -o "$out/pairs.jsonl"
fi

# greedy accuracy on the two problem sets; the chat template applies (SmolLM2 is a chat
# model), the same prompt before and after
evaluate() { # MODEL DIR
    [ -f "$2/gsm8k/eval_results.json" ] ||
        "$bin" eval --model "$1" --dataset assets/gsm8k/test.jsonl --eval-samples 300 \
            --max-new-tokens 256 --output-dir "$2/gsm8k" >/dev/null
    [ -f "$2/svamp/eval_results.json" ] ||
        "$bin" eval --model "$1" --dataset svamp:assets/svamp/test.jsonl --eval-samples 300 \
            --max-new-tokens 256 --output-dir "$2/svamp" >/dev/null
}
stamp "the start"
evaluate "$gguf" "$out/start"

# the same 64 held-out pairs (the seed's draw) for both arms
for credit in full first-error; do
    dir=$out/$credit
    if [ ! -f "$dir/model.safetensors" ]; then
        stamp "dpo, $credit credit, $steps steps"
        # shellcheck disable=SC2046
        "$bin" dpo --model "$gguf" --dataset "$out/pairs.jsonl" --lora-rank 16 \
            --pair-credit "$credit" --steps "$steps" --eval-every 20 --save-every 10 \
            --output-dir "$dir" $(resume_if "$dir") </dev/null
    fi
    stamp "after dpo, $credit"
    evaluate "$dir" "$dir/after"
done

python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def acc(d):
    p = out / d / "eval_results.json"
    return f"{100 * json.loads(p.read_text())['accuracy']['accuracy']:.1f}%" if p.exists() else "–"
def pair(arm, which):
    rows = [json.loads(l) for l in (out / arm / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/rewards/accuracies" in r]
    r = ev[which]
    return f"{100 * r['eval/rewards/accuracies']:.1f}% (margin {r['eval/rewards/margins']:+.2f}, step {r['step']})"
print("| model | held-out pair accuracy | GSM8K (300) | SVAMP (300) |")
print("|---|---|---|---|")
print(f"| SmolLM2-135M-Instruct | – | {acc('start/gsm8k')} | {acc('start/svamp')} |")
for arm in ("full", "first-error"):
    print(f"| + DPO, {arm} credit | {pair(arm, -1)} | {acc(arm + '/after/gsm8k')} | {acc(arm + '/after/svamp')} |")
PY
