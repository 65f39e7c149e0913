#!/usr/bin/env bash
# Distillation on this machine: SmolLM2-135M-Instruct after the real-model study's SFT
# (bench/real_model_study.sh; the plain GGUF with TEACHER=...) as the teacher, a third
# of its layers (0,3,…,27) as the student, each strategy against SFT of the same student
# on the same data and steps (`--distill-alpha 0` is SFT on the same harness), and a
# ~28M random-weight student (bench/distill/student-30m.json) by the logit strategy.
# Held-out KL to the teacher and greedy accuracy on the study's held-out problems (the
# first 200), step time and peak memory (/usr/bin/time), one row per run.
#
# Then on-policy against off-policy distillation from the same warm start (the logit
# student above), $CONT_STEPS (50) more steps each: off-policy logit distillation on the
# SFT solutions (8 a step) against `train --algorithm on-policy-distill` (the student
# samples 4 answers to each of 2 questions a step, every token rewarded by
# log π_T − log π_S; no outcome reward, no KL to a reference). Both train on about the
# same number of student tokens a step; the table puts held-out accuracy against the
# tokens trained on so far (`tokens/trained`).
#
# Every run resumes: rerun after a kill. Needs hours on 2 cores; run it in the background:
#
#   nohup bash bench/distill_study.sh > runs/distill-study.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
out=${OUT:-runs/distill-study}
data=${DATA:-runs/real-model-study/data}
teacher=${TEACHER:-runs/real-model-study/sft}
steps=${STEPS:-100}
kept=0,3,6,9,12,15,18,21,24,27
mkdir -p "$out"
[ -f "$data/sft.jsonl" ] || { echo "no $data/sft.jsonl: run STAGES=data,sft bash bench/real_model_study.sh first" >&2; exit 1; }
common=(--teacher "$teacher" --dataset "$data/sft.jsonl" --eval-dataset "$data/test.jsonl"
    --eval-samples 200 --eval-every "$((steps / 2))" --max-new-tokens 160 --steps "$steps"
    --batch-size 8 --save-every 10)
source bench/resume_if.sh
run() { # NAME FLAGS...
    local name=$1 dir=$out/$1
    shift
    [ -f "$dir/model.safetensors" ] && return
    echo "== $name: $* ($(date +%H:%M:%S))"
    # shellcheck disable=SC2046
    /usr/bin/time -f "%M" -o "$dir.peak-kib" "$bin" distill "${common[@]}" "$@" \
        --output-dir "$dir" $(resume_if "$dir") </dev/null
}
run sft --student-layers "$kept" --distill-alpha 0
run logit --student-layers "$kept" --strategy logit
run attention --student-layers "$kept" --strategy attention
run feature --student-layers "$kept" --strategy feature
run random-logit --student random:bench/distill/student-30m.json --strategy logit

# on-policy against off-policy from the logit student
cont=${CONT_STEPS:-50}
warm=$out/logit
contd=(--eval-dataset "$data/test.jsonl" --eval-samples 200 --eval-every "$((cont / 2))"
    --max-new-tokens 160 --steps "$cont" --save-every 10)
if [ ! -f "$out/off-policy/model.safetensors" ]; then
    dir=$out/off-policy
    echo "== off-policy: logit distillation from $warm ($(date +%H:%M:%S))"
    # shellcheck disable=SC2046
    "$bin" distill --teacher "$teacher" --student "$warm" --strategy logit --dataset "$data/sft.jsonl" \
        --batch-size 8 "${contd[@]}" --output-dir "$dir" $(resume_if "$dir") </dev/null
fi
if [ ! -f "$out/on-policy/eval_results.json" ]; then
    dir=$out/on-policy
    echo "== on-policy: distillation from $warm's own samples ($(date +%H:%M:%S))"
    # shellcheck disable=SC2046
    "$bin" train --model "$warm" --algorithm on-policy-distill --teacher "$teacher" \
        --dataset "$data/rl.jsonl" --reward correctness=0 --beta 0 --learning-rate 1e-4 \
        --prompts-per-step 2 --num-generations 4 --temperature 1.0 "${contd[@]}" \
        --output-dir "$dir" $(resume_if "$dir") </dev/null
fi

python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | held-out KL (start → end) | held-out accuracy (start → end) | median step (s) | peak RSS (MiB) |")
print("|---|---|---|---|---|")
for name in ["sft", "logit", "attention", "feature", "random-logit"]:
    m = out / name / "metrics.jsonl"
    if not m.exists():
        continue
    rows = [json.loads(l) for l in m.read_text().splitlines()]
    ev = [r for r in rows if "eval/distill/kl" in r]
    steps = [r["perf/step_seconds"] for r in rows if "perf/step_seconds" in r]
    peak = out / f"{name}.peak-kib"
    rss = f"{int(peak.read_text()) / 1024:.0f}" if peak.exists() else "–"
    kl = f"{ev[0]['eval/distill/kl']:.3f} → {ev[-1]['eval/distill/kl']:.3f}"
    acc = f"{100 * ev[0]['eval/accuracy']:.1f}% → {100 * ev[-1]['eval/accuracy']:.1f}%"
    print(f"| {name} | {kl} | {acc} | {statistics.median(steps):.1f} | {rss} |")
PY

python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n| run | step | student tokens trained on | held-out accuracy |")
print("|---|---|---|---|")
for name in ["off-policy", "on-policy"]:
    m = out / name / "metrics.jsonl"
    if not m.exists():
        continue
    seen = 0
    for r in (json.loads(l) for l in m.read_text().splitlines() if l.strip()):
        seen += r.get("tokens/trained", 0)
        if "eval/accuracy" in r:
            print(f"| {name} | {r['step']} | {int(seen)} | {100 * r['eval/accuracy']:.1f}% |")
PY
