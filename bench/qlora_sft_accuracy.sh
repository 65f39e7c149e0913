#!/usr/bin/env bash
# LoRA against QLoRA after the same SFT recipe on SmolLM2-135M-Instruct: the f32 base
# (the GGUF dequantized), the GGUF's own blocks held quantized (`keep`: the same weights,
# so only f32 summation order differs), and the dequantized GGUF quantized again to
# q4_0 (a second rounding), each trained on the real-model study's SFT problems and
# evaluated on the first 200 of its held-out problems (greedy), with each run's median
# step time and peak resident memory.
#
#   bash bench/qlora_sft_accuracy.sh      # resumes: finished runs are skipped
#
# Needs the study's problems (STAGES=data bash bench/real_model_study.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CAL_GRPO:-target/release/cal-grpo}
out=${OUT:-runs/qlora-sft}
data=${DATA:-runs/real-model-study/data}
gguf=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$data/sft.jsonl" ] || { echo "no $data/sft.jsonl: run STAGES=data bash bench/real_model_study.sh" >&2; exit 1; }
mkdir -p "$out"
source bench/resume_if.sh
for base in ${BASES:-none keep q4_0}; do
    dir=$out/$base
    [ -f "$dir/adapter/adapter_config.json" ] && continue
    resume=$(resume_if "$dir")
    echo "== $base ($(date +%H:%M:%S))"
    # shellcheck disable=SC2086
    /usr/bin/time -f "%M" -o "$dir.peak-kib" "$bin" sft --model "$gguf" --dataset "$data/sft.jsonl" \
        --eval-dataset "$data/test.jsonl" --eval-samples 200 --eval-every "${STEPS:-40}" \
        --skip-start-eval --steps "${STEPS:-40}" --batch-size 4 --learning-rate 2e-4 \
        --lora-rank 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
        --quantize-base "$base" --max-new-tokens 160 --save-every 10 --no-export \
        --output-dir "$dir" $resume </dev/null
done
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| base | held-out accuracy (200) | arithmetic steps right | median step (s) | peak RSS (GB) |")
print("|---|---|---|---|---|")
for base in ["none", "keep", "q4_0"]:
    m = out / base / "metrics.jsonl"
    if not m.exists():
        continue
    rows = [json.loads(l) for l in m.read_text().splitlines()]
    ev = [r for r in rows if "eval/accuracy" in r]
    steps = [r["perf/step_seconds"] for r in rows if "perf/step_seconds" in r]
    peak = out / f"{base}.peak-kib"
    rss = f"{int(peak.read_text()) / 1e6:.2f}" if peak.exists() else "–"
    acc = f"{100 * ev[-1]['eval/accuracy']:.1f}%" if ev else "–"
    st = f"{100 * ev[-1]['eval/step_accuracy']:.1f}%" if ev and "eval/step_accuracy" in ev[-1] else "–"
    name = {"none": "f32 (LoRA)", "keep": "keep, Q4_1 (QLoRA)", "q4_0": "q4_0 (QLoRA)"}[base]
    print(f"| {name} | {acc} | {st} | {statistics.median(steps):.1f} | {rss} |")
PY
