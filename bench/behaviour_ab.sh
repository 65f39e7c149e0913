#!/usr/bin/env bash
# Behaviour A/B of two builds: a GRPO, a CAL, a PPO (CAL token rewards through GAE)
# and a LoRA run of a few steps each, problem style named; every metrics.jsonl value
# but timings must be equal, and the trained weights' SHA-256 too.
#
#   cp target/release/cal-grpo /tmp/cal-old   # before the change
#   cargo build --release -p cal-cli          # after it
#   bash bench/behaviour_ab.sh /tmp/cal-old target/release/cal-grpo [STEPS=4]
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 steps=${3:-4}
tmp=$(mktemp -d /tmp/behaviour-ab.XXXX)
common=(--style chain --chain-steps 3 --steps "$steps" --eval-samples 20 --save-every "$steps")
runs=(
  "grpo|"
  "cal|--use-cal --api-provider reference"
  "cal-prefix|--use-cal --credit prefix --api-provider calculator"
  "ppo-cal-scaled|--algorithm ppo --use-cal --credit span-scaled --api-provider reference"
  "ppo-cal|--algorithm ppo --use-cal --api-provider reference"
  "lora-cal|--use-cal --api-provider reference --lora-rank 4"
)
fail=0
for r in "${runs[@]}"; do
  name=${r%%|*} flags=${r#*|}
  for side in a b; do
    bin=$a; [ $side = b ] && bin=$b
    # shellcheck disable=SC2086
    "$bin" train "${common[@]}" $flags --output-dir "$tmp/$name-$side" >/dev/null 2>&1
  done
  same=$(python3 - "$tmp/$name-a/metrics.jsonl" "$tmp/$name-b/metrics.jsonl" <<'PY'
import json, sys
def rows(p):
    out = []
    for l in open(p):
        v = json.loads(l)
        timing = lambda k: (k.startswith("perf/") and k != "perf/padded_tokens") or k.endswith("latency_ms")  # noqa: E731
        out.append({k: x for k, x in v.items() if not timing(k)})
    return out
a, b = rows(sys.argv[1]), rows(sys.argv[2])
diff = [(i, k) for i, (x, y) in enumerate(zip(a, b)) for k in set(x) | set(y) if x.get(k) != y.get(k)]
print("same" if len(a) == len(b) and not diff else f"differ: {len(a)} vs {len(b)} rows, {diff[:5]}")
PY
)
  wa=$(sha256sum "$tmp/$name-a/checkpoints/step-$(printf %06d "$steps")/weights.safetensors" | cut -c1-16)
  wb=$(sha256sum "$tmp/$name-b/checkpoints/step-$(printf %06d "$steps")/weights.safetensors" | cut -c1-16)
  w=$([ "$wa" = "$wb" ] && echo "same ($wa)" || echo "differ ($wa / $wb)")
  echo "| $name | $flags | metrics $same | weights $w |"
  [[ $same == same && $wa == "$wb" ]] || fail=1
done
rm -rf "$tmp"
exit $fail
