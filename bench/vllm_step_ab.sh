#!/usr/bin/env bash
# The GRPO step with local generation against the same step with rollouts on a vLLM
# server, alternately, split into generate / sync / train (train = step − generate −
# sync, from each step's perf/* metrics). One server, started once before the rounds
# (its start-up is printed apart, not counted in the steps); LoRA, so that the sync is
# the adapter. Same seed, data and settings on both sides. Then what a full-weight
# sync costs on the same server: writing the model (untied, as a full sync writes it)
# and vLLM's in-place reload of it, three times each.
#
#   bash scripts/fetch-assets.sh --with-model
#   bash bench/vllm_step_ab.sh [ROUNDS] [STEPS] [MODEL]   # defaults 2, 2, the SmolLM2 GGUF
set -euo pipefail
rounds=${1:-2}
steps=${2:-2}
model=${3:-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
cd "$(dirname "$0")/.."
cargo build --release -q -p cal-cli
bin=$PWD/target/release/cal-grpo
py=${CAL_VLLM_PYTHON:-$(bash scripts/install-vllm.sh)}
tmp=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill -- -"$server" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
"$bin" export --model "$model" --untie-embeddings --output-dir "$tmp/base" >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
t0=$SECONDS
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=1 setsid "$py" \
  -m vllm.entrypoints.openai.api_server --model "$tmp/base" --dtype float32 \
  --max-model-len 1024 --enable-lora --max-lora-rank 8 --host 127.0.0.1 --port "$port" \
  > "$tmp/server.log" 2>&1 &
server=$!
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
  kill -0 "$server" 2>/dev/null || { tail -20 "$tmp/server.log"; exit 1; }
  sleep 2
done
echo "vLLM server ready after $((SECONDS - t0)) s" >&2
common=(train --model "$tmp/base" --dataset assets/gsm8k/train.jsonl
  --eval-dataset assets/gsm8k/test.jsonl --eval-samples 1 --lora-rank 8
  --prompts-per-step 4 --num-generations 4 --max-new-tokens 128 --steps "$steps")
for r in $(seq "$rounds"); do
  for engine in local vllm; do
    out="$tmp/r$r-$engine"
    args=("${common[@]}" --rollout-engine "$engine" --output-dir "$out")
    [ "$engine" = vllm ] && args+=(--rollout-url "http://127.0.0.1:$port")
    "$bin" "${args[@]}" > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
    echo "round $r, $engine: done" >&2
  done
done
for i in 1 2 3; do
  t0=$(date +%s.%N)
  "$bin" export --model "$tmp/r1-local/model" --untie-embeddings --output-dir "$tmp/full-$i" > /dev/null
  t1=$(date +%s.%N)
  curl -sf "http://127.0.0.1:$port/collective_rpc" -H 'Content-Type: application/json' \
    -d "{\"method\": \"reload_weights\", \"kwargs\": {\"weights_path\": \"$tmp/full-$i\"}}" > /dev/null
  curl -sf -X POST "http://127.0.0.1:$port/reset_prefix_cache" > /dev/null
  t2=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc) $(echo "$t2 - $t1" | bc)" >> "$tmp/full"
  rm -rf "$tmp/full-$i"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$tmp" "$rounds" <<'PY'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
rows = {"local": [], "vllm": []}
for r in range(1, rounds + 1):
    for e in rows:
        for line in open(f"{tmp}/r{r}-{e}/metrics.jsonl"):
            m = json.loads(line)
            gen, sync = m["perf/generate_seconds"], m.get("perf/sync_seconds", 0.0)
            rows[e].append((m["perf/step_seconds"], gen, sync, m["perf/step_seconds"] - gen - sync,
                            m.get("rollout/logprob_abs_diff")))
med = lambda xs: statistics.median(xs)
print("| rollouts | steps | median step s | generate s | sync s | train s | mean abs(logp_trainer - logp_engine) |")
print("|---|---|---|---|---|---|---|")
for e, xs in rows.items():
    d = [x[4] for x in xs if x[4] is not None]
    print(f"| {e} | {len(xs)} | {med([x[0] for x in xs]):.1f} | {med([x[1] for x in xs]):.1f} | "
          f"{med([x[2] for x in xs]):.3f} | {med([x[3] for x in xs]):.1f} | "
          f"{'%.2e' % statistics.mean(d) if d else '-'} |")
ratio = med([x[1] for x in rows["vllm"]]) / med([x[1] for x in rows["local"]])
full = [tuple(map(float, l.split())) for l in open(f"{tmp}/full")]
print(f"\nfull-weight sync: write {statistics.median(f[0] for f in full):.1f} s (the export, process start and model load included), "
      f"reload in place {statistics.median(f[1] for f in full):.1f} s (medians of {len(full)})")
print(f"generate, vllm / local: {ratio:.2f}x; steps per side, in run order: "
      + "; ".join(f"{e}: " + ", ".join(f"{x[0]:.1f}" for x in xs) for e, xs in rows.items()))
PY
