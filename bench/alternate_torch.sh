#!/usr/bin/env bash
# SmolLM2-135M's shape (random weights, bench/configs/smollm2-135m.json, f32, CPU) in
# PyTorch + transformers and in cal-grpo, ALTERNATELY in one invocation: torch, cal,
# torch, cal, ... Each side measures, in its own process:
#   - generation, batch 8 x 128 sampled tokens (fixed length);
#   - one training step (forward + backward + AdamW) on 8 x 256 tokens;
#   - its own f32 matmul rate (torch 2048^3; cal-grpo's `bench model` reference).
# Prints medians and every run per side, the step's share of the best GEMM rate seen
# on either side in this invocation (the normaliser), and the load average. Kept out of
# CI (it needs torch).
#
#   python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch transformers
#   cargo build --release -p cal-cli
#   bash bench/alternate_torch.sh [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
PY="${TORCH_PYTHON:-/tmp/trlvenv/bin/python}"
BIN="${CAL_GRPO_BIN:-target/release/cal-grpo}"
CFG=bench/configs/smollm2-135m.json
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
before=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
  "$PY" bench/gpu_torch.py --config "$CFG" --device cpu --dtype f32 --batches 8 \
    --new-tokens 128 --train-batch 8 --seq 256 --repeats 1 --matmul-n 2048 2>/dev/null \
    | tail -1 >> "$tmp/torch.jsonl"
  "$BIN" bench model --model "random:$CFG" --repeats 1 --seq 256 --new-tokens 128 --batch 8 \
    2>/dev/null | grep -E '^\| [^m-]' >> "$tmp/cal.md"
  echo "round $r: torch $(tail -1 "$tmp/torch.jsonl" | cut -c1-200) | cal $(tail -1 "$tmp/cal.md")" >&2
done
python3 - "$tmp/torch.jsonl" "$tmp/cal.md" "$before" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(nproc)" <<'PY'
import json, statistics, sys
torch_rows = [json.loads(l) for l in open(sys.argv[1])]
# | model | params | gen tok/s | train step (s) | train GFLOP/s | ref pass (s) | matmul GFLOP/s | ...
cal_rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in open(sys.argv[2])]
tg = [r["generate_tokens_per_s"]["8"] for r in torch_rows]
ts = [r["train_step_s"] for r in torch_rows]
tm = [r["matmul_tflops"] * 1e3 for r in torch_rows]
cg = [float(r[2]) for r in cal_rows]
cs = [float(r[3]) for r in cal_rows]
cm = [float(r[6]) for r in cal_rows]
best = max(tm + cm)
params = torch_rows[0]["params"]
flops = 6 * params * 8 * 256 / 1e9
med = statistics.median
fmt = lambda xs, p=1: ", ".join(f"{x:.{p}f}" for x in xs)
print("| SmolLM2-135M shape, f32, CPU | gen tok/s (batch 8 x 128) | train step s (8 x 256) | train tokens/s | share of best GEMM | own matmul GFLOP/s |")
print("|---|---|---|---|---|---|")
for name, g, s, m in (("PyTorch " + torch_rows[0]["torch"] + " + transformers", tg, ts, tm), ("cal-grpo", cg, cs, cm)):
    print(f"| {name} | {med(g):.1f} ({fmt(g)}) | {med(s):.2f} ({fmt(s, 2)}) | {8 * 256 / med(s):.0f} | "
          f"{flops / med(s) / best:.0%} | {med(m):.0f} ({fmt(m, 0)}) |")
print(f"\ncal-grpo / PyTorch: generation {med(cg) / med(tg):.2f}x the tokens/s, training step "
      f"{med(ts) / med(cs):.2f}x the speed; best f32 GEMM seen: {best:.0f} GFLOP/s; "
      f"{len(cg)} alternating rounds; {sys.argv[5]} threads each; load average before: {sys.argv[3]}, after: {sys.argv[4]}")
PY
