#!/usr/bin/env bash
# Distillation on this machine: SmolLM2-135M-Instruct after the real-model study's SFT
# (bench/real_model_study.sh; the plain GGUF with TEACHER=...) as the teacher, a third
# of its layers (0,3,…,27) as the student, each strategy against SFT of the same student
# on the same data and steps (`--distill-alpha 0` is SFT on the same harness), and a
# ~28M random-weight student (bench/distill/student-30m.json) by the logit strategy.
# Held-out KL to the teacher and greedy accuracy on the study's held-out problems (the
# first 200), step time and peak memory (/usr/bin/time), one row per run.
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
run() { # NAME FLAGS...
    local name=$1 dir=$out/$1
    shift
    [ -f "$dir/model.safetensors" ] && return
    echo "== $name: $* ($(date +%H:%M:%S))"
    local resume=()
    [ -d "$dir/checkpoints" ] && resume=(--resume)
    [ -d "$dir" ] && [ ${#resume[@]} -eq 0 ] && resume=(--overwrite)
    /usr/bin/time -f "%M" -o "$dir.peak-kib" "$bin" distill "${common[@]}" "$@" \
        --output-dir "$dir" "${resume[@]}" </dev/null
}
run sft --student-layers "$kept" --distill-alpha 0
run logit --student-layers "$kept" --strategy logit
run attention --student-layers "$kept" --strategy attention
run feature --student-layers "$kept" --strategy feature
run random-logit --student random:bench/distill/student-30m.json --strategy logit

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
