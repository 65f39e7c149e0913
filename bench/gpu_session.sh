#!/usr/bin/env bash
# Everything the GPU run measures, as one script for a GPU machine without network or
# Rust toolchain. Prepare here, run there:
#
#   bash bench/gpu_session.sh prepare     # here: CUDA bundle, TRL wheels, tokenizer -> target/gpu-carry (< 64 MiB)
#   bash bench/gpu_session.sh run [tests|bench|trl|experiment]...   # there, with target/gpu-carry carried
#
# The device tool allows 10 minutes per call: run the parts in separate calls if needed.
# `run` prints, in order: the GPU test group; for SmolLM2-135M and Qwen2.5-0.5B shapes
# (random weights, bf16) cal-grpo and PyTorch alternately (cal, torch, cal, torch):
# generation tok/s at batch 8/64/256, the training step's tokens/s and MFU against the
# bf16 matmul rate measured in the same run; TRL's GRPOTrainer step; and the wall time
# of `cal-grpo experiment --device cuda` on the embedded benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=target/gpu-carry

prepare() {
    bash scripts/build-cuda.sh --tests
    rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/tok-smollm2"
    cp target/cuda/gpu-bundle.tar.xz "$carry/"
    # TRL and what the GPU image lacks (it has torch, transformers, accelerate, pyarrow).
    python3 -m pip download --quiet --no-deps --dest "$carry/wheels" \
        trl datasets dill multiprocess
    # SmolLM2's tokenizer, out of the GGUF (the GGUF itself is too big to carry).
    local py=${TRL_PYTHON:-/tmp/trlvenv/bin/python}
    "$py" - <<'EOF'
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained("assets/smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
t.save_pretrained("target/gpu-carry/tok-smollm2")
EOF
    du -sh "$carry"
    echo "carry: [\"$carry\"]; then: bash bench/gpu_session.sh run"
}

run() {
    local parts=("$@")
    [ ${#parts[@]} -gt 0 ] || parts=(tests bench trl experiment)
    local b="$carry/bin"
    mkdir -p "$b" && tar -xJf "$carry/gpu-bundle.tar.xz" -C "$b"
    python3 -m pip install --quiet --no-index --no-deps "$carry"/wheels/*.whl || true
    # The CUDA 13 libraries of PyTorch's wheels, and the driver.
    LD_LIBRARY_PATH=$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))'):${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    for part in "${parts[@]}"; do "run_$part" "$b"; done
}

run_tests() {
    echo "== GPU tests"
    "$1/device_path" 2>&1 | tail -15
    "$1/gpu" 2>&1 | tail -12
}

run_bench() {
    local b=$1
    for cfg in bench/configs/smollm2-135m.json bench/configs/qwen2.5-0.5b.json; do
        for round in 1 2; do
            echo "== $cfg round $round: cal-grpo"
            "$b/cal-grpo" bench generate --model "random:$cfg" --device cuda --dtype bf16 \
                --batch 8,64,256 --new-tokens 128 --repeats 3
            "$b/cal-grpo" bench model --model "random:$cfg" --device cuda --dtype bf16 \
                --batch 8 --seq 256 --new-tokens 128 --repeats 3
            echo "== $cfg round $round: PyTorch"
            python3 bench/gpu_torch.py --config "$cfg" --device cuda --dtype bf16 \
                --batches 8,64,256 --new-tokens 128 --train-batch 8 --seq 256
        done
    done
}

run_trl() {
    echo "== TRL GRPOTrainer step (SmolLM2 shape, 4 x 4, 128 new tokens, bf16)"
    python3 bench/gpu_torch.py --config bench/configs/smollm2-135m.json --device cuda --dtype bf16 \
        --batches 8 --trl --tokenizer "$carry/tok-smollm2" || echo "TRL step failed"
}

run_experiment() {
    echo "== experiment --device cuda (embedded benchmark, cold cache)"
    local t0=$SECONDS
    CAL_GRPO_CACHE=$(mktemp -d) "$1/cal-grpo" experiment --device cuda --output-dir /tmp/exp-cuda 2>&1 | tail -8
    echo "experiment wall time on the GPU: $((SECONDS - t0)) s"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
