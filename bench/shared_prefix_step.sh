#!/usr/bin/env bash
# One prompt pass per group, measured: the SmolLM2-135M-Instruct RL step with the group's
# prompt shared (`--shared-prefix on`) against every row carrying its own (`off`), the two
# taking turns ROUNDS times. SVAMP with 4 worked examples in the prompt (about 480 prompt
# tokens), PROMPTS prompts x 8 generations, 64 new tokens, LoRA rank 16, beta 0.04 (so the
# reference pass runs), STEPS steps per run. MODEL defaults to the GGUF asset; point it at
# the SVAMP SFT warm start (bench/real_model_rl.sh makes runs/smollm2-svamp-sft) to time
# the study's own step. Prints one row per run (step, generate, reference pass, update,
# peak RSS), then medians over every step and the off/on ratio.
#   bash scripts/fetch-assets.sh --with-model && cargo build --release -p cal-cli
#   bash bench/shared_prefix_step.sh [ROUNDS=2] [STEPS=2] [PROMPTS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
model=${MODEL:-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
rounds=${1:-2} steps=${2:-2} prompts=${3:-2}
out=${OUT:-runs/shared-prefix-step}
mkdir -p "$out"
before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "| run | step s | generate s | reference pass s | update s | micro-batches | padded tokens computed | peak RSS GiB |"
echo "|---|---|---|---|---|---|---|---|"
for round in $(seq "$rounds"); do
    for mode in on off; do
        dir=$out/$mode-$round
        /usr/bin/time -f "%M" -o "$dir.rss" "$bin" train --model "$model" \
            --dataset svamp:assets/svamp/test.jsonl --few-shot 4 --prompts-per-step "$prompts" \
            --num-generations 8 --max-new-tokens 64 --steps "$steps" --eval-samples 1 \
            --lora-rank 16 --beta 0.04 --shared-prefix "$mode" --overwrite --output-dir "$dir" \
            > "$dir.log" 2>&1
        python3 - "$dir" "$mode" "$(cat "$dir.rss")" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in rows if "perf/step_seconds" in r]
col = lambda k, f="{:.1f}": " / ".join(f.format(r[k]) for r in steps)
print(f"| {sys.argv[2]} | {col('perf/step_seconds')} | {col('perf/generate_seconds')} | "
      f"{col('perf/fixed_logprob_seconds')} | {col('perf/update_seconds')} | "
      f"{col('perf/micro_batches', '{:.0f}')} | {col('perf/padded_tokens', '{:.0f}')} | "
      f"{int(sys.argv[3]) / 2**20:.2f} |")
PY
    done
done
python3 - "$out" "$rounds" "$before" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
keys = ["perf/step_seconds", "perf/generate_seconds", "perf/fixed_logprob_seconds", "perf/update_seconds"]
med = {}
for mode in ["on", "off"]:
    steps = [json.loads(l) for r in range(1, rounds + 1)
             for l in open(f"{out}/{mode}-{r}/metrics.jsonl") if "perf/step_seconds" in l]
    med[mode] = {k: statistics.median(s[k] for s in steps) for k in keys}
print("\n| median (s) | step | generate | reference pass | update |\n|---|---|---|---|---|")
for mode in ["on", "off"]:
    print(f"| shared prefix {mode} | " + " | ".join(f"{med[mode][k]:.1f}" for k in keys) + " |")
print("| off / on | " + " | ".join(f"{med['off'][k] / med['on'][k]:.2f}x" for k in keys) + " |")
print(f"\nload average before: {sys.argv[3]}, after: {sys.argv[4]}")
PY
