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
    rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/tok-smollm2" "$carry/cache"
    cp target/cuda/gpu-bundle.tar.xz "$carry/"
    # TRL and what the GPU image lacks (it has torch, transformers, accelerate, pyarrow),
    # as wheels for its Python 3.12.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform any --dest "$carry/wheels" trl datasets dill multiprocess
    # SmolLM2's tokenizer, out of the GGUF (the GGUF itself is too big to carry); any
    # Python with transformers and gguf.
    "${TOKENIZER_PYTHON:-python3}" - <<'PY'
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained("assets/smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
t.save_pretrained("target/gpu-carry/tok-smollm2")
PY
    # The default experiment's warm start, trained here on the CPU (the GPU run then
    # times RL and evaluation, not the SFT that every later run reads from the cache).
    CAL_GRPO_CACHE="$PWD/$carry/cache" target/release/cal-grpo experiment --seeds 1 --steps 0 \
        --output-dir "$(mktemp -d)/sft-only" >/dev/null
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
    "$1/device_path" 2>&1 | tail -40
    "$1/gpu" 2>&1 | tail -30
}

run_bench() {
    local b=$1
    for cfg in ${BENCH_CONFIGS:-bench/configs/smollm2-135m.json bench/configs/qwen2.5-0.5b.json}; do
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
    echo "== experiment --device cuda (embedded benchmark, the carried warm start)"
    local cache t0=$SECONDS
    cache=$(mktemp -d) && cp -r "$carry/cache/." "$cache/"
    CAL_GRPO_CACHE=$cache timeout "${EXPERIMENT_TIMEOUT:-300}" "$1/cal-grpo" experiment \
        --device cuda --output-dir /tmp/exp-cuda 2>&1 | tail -12
    echo "experiment wall time on the GPU: $((SECONDS - t0)) s"
    [ -z "${OUT:-}" ] || cp /tmp/exp-cuda/summary.md "$OUT/experiment-summary.md" 2>/dev/null || true
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
