#!/usr/bin/env bash
# GRPO steps on SmolLM2-135M-Instruct (GSM8K, 4 prompts x 4 generations, 128 new
# tokens, beta 0.04) with fixed 2-row micro-batches (A, the default) and with rows
# sorted by length and packed into a token budget (B), ALTERNATELY in one invocation:
# A, B, A, B, ... Same seed, so both see the same rollouts at each step. Prints medians
# of the update time (step minus generation), the padding fraction, micro-batches per
# step and peak RSS.
#
#   bash scripts/fetch-assets.sh --with-model
#   bash bench/micro_batch_tokens.sh [ROUNDS] [STEPS] [TOKENS]   # defaults 3, 2, 1024
set -euo pipefail
rounds=${1:-3}
steps=${2:-2}
tokens=${3:-1024}
cd "$(dirname "$0")/.."
cargo build --release -q -p cal-cli
bin=target/release/cal-grpo
gguf=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || { echo "run: bash scripts/fetch-assets.sh --with-model" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
settings=("--micro-batch 2" "--micro-batch 0 --micro-batch-tokens $tokens")
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
for r in $(seq "$rounds"); do
  for i in 0 1; do
    rm -rf "$tmp/run"
    # shellcheck disable=SC2086
    /usr/bin/time -f "%M" -o "$tmp/rss" "$bin" train --model "$gguf" \
      --dataset assets/gsm8k/train.jsonl --eval-dataset assets/gsm8k/test.jsonl --eval-samples 1 \
      --prompts-per-step 4 --num-generations 4 --max-new-tokens 128 --beta 0.04 \
      --steps "$steps" --seed "$r" ${settings[$i]} --output-dir "$tmp/run" >/dev/null 2>&1
    python3 - "$tmp/run/metrics.jsonl" "$i" "$(cat "$tmp/rss")" >> "$tmp/results" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if "perf/step_seconds" in m:
        print(sys.argv[2], m["perf/step_seconds"] - m["perf/generate_seconds"],
              m["perf/padding_fraction"], m["perf/micro_batches"], int(sys.argv[3]) / 1024)
EOF
    echo "round $r: ${settings[$i]}: $(grep -c "^$i " "$tmp/results") steps so far" >&2
  done
done
python3 - "$tmp/results" "${settings[@]}" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
names = sys.argv[2:]
print("| micro-batches | median update s | updates (s) | padding | micro-batches/step | peak RSS MiB |")
print("|---|---|---|---|---|---|")
med = []
for i, name in enumerate(names):
    r = [x for x in rows if int(x[0]) == i]
    up = [float(x[1]) for x in r]
    med.append(statistics.median(up))
    print(f"| `{name}` | {med[-1]:.1f} | {', '.join(f'{u:.1f}' for u in up)} | "
          f"{statistics.median(float(x[2]) for x in r):.0%} | {statistics.median(float(x[3]) for x in r):.0f} | "
          f"{max(float(x[4]) for x in r):.0f} |")
print(f"\nupdate time A / B: {med[0] / med[1]:.2f}x")
EOF
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
