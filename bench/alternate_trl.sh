#!/usr/bin/env bash
# One GRPO step on SmolLM2-135M-Instruct (4 prompts x 4 generations, 128 new tokens,
# beta 0.04, CPU), TRL's GRPOTrainer and `cal-grpo train` ALTERNATELY in one invocation:
# TRL, cal-grpo, TRL, cal-grpo, ... Each run does STEPS steps; its first step is dropped
# (warm-up), the rest are pooled per side. Prints medians, every step time, the load
# average before and after. Kept out of CI (it needs torch + TRL). Both sides train in
# f32 without gradient checkpointing (TRL's bf16 and checkpointing defaults are off;
# TRL_ARGS="--bf16 --gradient-checkpointing" restores them).
#
#   bash scripts/fetch-assets.sh --with-model
#   python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch transformers trl datasets accelerate gguf
#   cargo build --release -p cal-cli
#   bash bench/alternate_trl.sh [ROUNDS=3] [STEPS=2]
#   CAL_B_ARGS="--shared-prefix off" bash bench/alternate_trl.sh 3 2   # a third side in turn
#   CAL_B_BIN=/tmp/target-blas/release/cal-grpo CAL_B_ARGS=" " bash ...  # or another build
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
STEPS="${2:-2}"
PY="${TRL_PYTHON:-/tmp/trlvenv/bin/python}"
BIN="${CAL_GRPO_BIN:-target/release/cal-grpo}"
GGUF=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
before=$(cut -d' ' -f1-3 /proc/loadavg)
trl=() cal=() calb=()
# one cal-grpo run of STEPS steps with extra flags; prints its step times but the first
cal_run() {
  local dir bin=$BIN
  if [ "${1:-}" = --b ]; then bin=${CAL_B_BIN:-$BIN}; shift; fi
  dir=$(mktemp -d /tmp/cal-alt.XXXX)
  "$bin" train --model "$GGUF" --dataset assets/gsm8k/train.jsonl --eval-dataset assets/gsm8k/test.jsonl \
    --eval-samples 1 --prompts-per-step 4 --num-generations 4 --max-new-tokens 128 --beta 0.04 \
    --steps "$STEPS" --output-dir "$dir/run" "$@" >/dev/null 2>&1
  python3 -c "
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if 'perf/step_seconds' in l]
for r in rows[1:]:
    print(r['perf/step_seconds'], file=sys.stdout)
    print('  split: ' + ', '.join(f\"{k.split('/')[1]} {r[k]:.1f}\" for k in sorted(r) if k.startswith('perf/') and k.endswith('_seconds')), file=sys.stderr)
" "$dir/run/metrics.jsonl"
  rm -rf "$dir"
}
for r in $(seq 1 "$ROUNDS"); do
  # shellcheck disable=SC2086
  out=$("$PY" bench/trl_grpo_step.py --steps "$STEPS" ${TRL_ARGS:-} 2>/dev/null | tail -1)
  mapfile -t t < <(python3 -c "import json,sys; [print(x) for x in json.loads(sys.argv[1])['trl_step_seconds'][1:]]" "$out")
  trl+=("${t[@]}")
  mapfile -t t < <(cal_run)
  cal+=("${t[@]}")
  if [ -n "${CAL_B_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    mapfile -t t < <(cal_run --b $CAL_B_ARGS)
    calb+=("${t[@]}")
  fi
  echo "round $r: TRL ${trl[*]} | cal-grpo ${cal[*]} | ${CAL_B_ARGS:-} ${calb[*]}" >&2
done
python3 - "${#trl[@]}" "${CAL_B_ARGS:-}" "${trl[@]}" "${cal[@]}" "${calb[@]}" "$before" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import os, statistics, sys
n = int(sys.argv[1]); b_args = sys.argv[2]; xs = [float(x) for x in sys.argv[3:-2]]
trl, cal, calb = xs[:n], xs[n:2 * n], xs[2 * n:]
mt, mc = statistics.median(trl), statistics.median(cal)
print("| implementation | median step (s) | steps (s) |\n|---|---|---|")
print(f"| TRL GRPOTrainer | {mt:.1f} | {', '.join(f'{x:.1f}' for x in trl)} |")
print(f"| cal-grpo train | {mc:.1f} | {', '.join(f'{x:.1f}' for x in cal)} |")
if calb:
    mb = statistics.median(calb)
    b_args = " ".join(x for x in [b_args.strip(), os.environ.get("CAL_B_BIN", "")] if x)
    print(f"| cal-grpo train {b_args} | {mb:.1f} | {', '.join(f'{x:.1f}' for x in calb)} |")
    print(f"\ncal-grpo {b_args} / cal-grpo: {mb / mc:.2f}x; TRL / cal-grpo {b_args} = {mt / mb:.2f}x")
print(f"\ncal-grpo / TRL step time: {mc / mt:.2f}x (TRL / cal-grpo = {mt / mc:.2f}x); "
      f"alternating runs, first step of each run dropped; load average before: {sys.argv[-2]}, after: {sys.argv[-1]}")
PY
