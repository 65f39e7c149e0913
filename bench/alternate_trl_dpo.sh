#!/usr/bin/env bash
# One DPO step on SmolLM2-135M-Instruct with LoRA (8 pairs, rank 16 on q,k,v,o, β 0.1,
# f32, CPU), TRL 1.16's DPOTrainer (bench/trl_dpo_step.py) and `cal-grpo dpo` TAKING
# TURNS in one invocation: TRL, cal-grpo, TRL, ... Each run does STEPS steps on the same
# pairs; its first step is dropped (warm-up), the rest pooled per side. Prints the median
# step time of each, the ratio, each process's peak resident memory and the load average
# before and after. Kept out of CI (it needs torch, TRL and peft).
#
#   bash scripts/fetch-assets.sh --with-model && cargo build --release -p cal-cli
#   python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch transformers trl peft datasets accelerate gguf
#   cal-grpo plant-errors --dataset assets/gsm8k/train.jsonl --n 1200 --correct-share 0 -o runs/labels.jsonl
#   cal-grpo make-pairs --labels runs/labels.jsonl --chat -o runs/pairs.jsonl
#   bash bench/alternate_trl_dpo.sh runs/pairs.jsonl [ROUNDS=3] [STEPS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=$1 ROUNDS=${2:-3} STEPS=${3:-3}
PY=${TRL_PYTHON:-/tmp/trlvenv/bin/python}
BIN=${CAL_GRPO_BIN:-target/release/cal-grpo}
GGUF=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
before=$(cut -d' ' -f1-3 /proc/loadavg)
tmp=$(mktemp -d /tmp/dpo-alt.XXXX)
# the first 8×STEPS pairs, the same rows on both sides (TRL reads them in order; ours
# shuffles by seed, so it gets exactly these as its training set, none held out)
head -n $((8 * STEPS)) "$PAIRS" >"$tmp/train.jsonl"
head -n 8 "$PAIRS" >"$tmp/held.jsonl"
trl=() cal=() trl_mem=() cal_mem=()
for r in $(seq 1 "$ROUNDS"); do
  /usr/bin/time -f %M -o "$tmp/mem" "$PY" bench/trl_dpo_step.py --pairs "$tmp/train.jsonl" --steps "$STEPS" \
    >"$tmp/trl.out" 2>"$tmp/trl.err" || { tail -20 "$tmp/trl.err"; exit 1; }
  mapfile -t t < <(python3 -c "import json,sys; [print(x) for x in json.loads(open(sys.argv[1]).read().splitlines()[-1])['trl_step_seconds'][1:]]" "$tmp/trl.out")
  trl+=("${t[@]}") trl_mem+=("$(cat "$tmp/mem")")
  rm -rf "$tmp/run"
  /usr/bin/time -f %M -o "$tmp/mem" "$BIN" dpo --model "$GGUF" --dataset "$tmp/train.jsonl" \
    --eval-dataset "$tmp/held.jsonl" --lora-rank 16 --steps "$STEPS" --batch-size 8 \
    --save-every 0 --output-dir "$tmp/run" >/dev/null 2>"$tmp/cal.err" || { tail -20 "$tmp/cal.err"; exit 1; }
  mapfile -t t < <(python3 -c "
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if 'perf/step_seconds' in l]
[print(r['perf/step_seconds']) for r in rows[1:]]" "$tmp/run/metrics.jsonl")
  cal+=("${t[@]}") cal_mem+=("$(cat "$tmp/mem")")
  echo "round $r: TRL ${trl[*]} | cal-grpo ${cal[*]}" >&2
done
python3 - "${#trl[@]}" "${trl[@]}" "${cal[@]}" "${trl_mem[*]}" "${cal_mem[*]}" "$before" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import statistics, sys
n = int(sys.argv[1]); xs = [float(x) for x in sys.argv[2:2 + 2 * n]]
trl, cal = xs[:n], xs[n:]
tm, cm = ([int(k) / 1024 for k in s.split()] for s in sys.argv[2 + 2 * n:4 + 2 * n])
print("| side | median step (s) | steps | peak RSS (MiB, max over runs) |")
print("|---|---|---|---|")
print(f"| TRL 1.16 DPOTrainer + peft | {statistics.median(trl):.1f} | {n} | {max(tm):.0f} |")
print(f"| cal-grpo dpo | {statistics.median(cal):.1f} | {len(cal)} | {max(cm):.0f} |")
print(f"ratio TRL / cal-grpo (median step): {statistics.median(trl) / statistics.median(cal):.2f}")
print(f"load average before {sys.argv[-2]}, after {sys.argv[-1]}")
PY
rm -rf "$tmp"
