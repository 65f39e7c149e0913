#!/usr/bin/env bash
# A real LLM judge through a real server: SmolLM2-135M-Instruct served by vLLM's CPU
# build, asked through the `openai` provider (`--oracle-base-url`) on the planted GSM8K
# labels, in the prompt variants the judge offers (few-shot or zero-shot, JSON mode on or
# off, a majority of 5 samples at temperature 0.7). Each variant writes
# runs/vllm-judge/<variant>.json; the SQLite cache makes a rerun free.
#
#   bash scripts/install-vllm.sh > /tmp/vllm.path      # once (about 7 minutes)
#   CAL_VLLM_PYTHON=$(cat /tmp/vllm.path) bash bench/vllm_judge.sh [N_LABELS=200]
#
# Needs runs/oracle-bench/gsm8k-planted.jsonl (docs/oracle-bench.md makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
bin=${CAL_GRPO:-target/release/cal-grpo}
py=${CAL_VLLM_PYTHON:?set CAL_VLLM_PYTHON to the python of scripts/install-vllm.sh}
out=${OUT:-runs/vllm-judge}
labels=${LABELS:-runs/oracle-bench/gsm8k-planted.jsonl}
port=${PORT:-8011}
mkdir -p "$out"
[ -f "$out/smollm2-hf/config.json" ] ||
    "$bin" export --model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output-dir "$out/smollm2-hf"

# 2 GiB of KV cache, not the 92% of memory vLLM reserves by default
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    "$py" -m vllm.entrypoints.openai.api_server --model "$out/smollm2-hf" \
    --served-model-name smollm2-135m --dtype float32 --max-model-len 4096 \
    --host 127.0.0.1 --port "$port" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 "$out/server.log"; exit 1; }
    sleep 2
done
echo "vLLM serving smollm2-135m on port $port"

judge=(--api-provider openai --cal-model smollm2-135m --oracle-base-url "http://127.0.0.1:$port/v1"
    --oracle-concurrency 8 --oracle-timeout 120 --limit "$n" --labels "$labels"
    --tokenizer assets/tokenizer-qwen3/tokenizer.json)
bench() {
    local name=$1
    shift
    echo "== $name"
    local t0=$SECONDS
    CAL_GRPO_CACHE="$out/cache" "$bin" oracle-bench "${judge[@]}" "$@" --output "$out/$name.json"
    echo "== $name: $((SECONDS - t0)) s"
}
bench few-shot-json
bench zero-shot-json --oracle-few-shot false
bench few-shot-plain --oracle-json-mode false
bench few-shot-json-votes5 --oracle-votes 5
