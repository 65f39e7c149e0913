#!/usr/bin/env bash
# Build `cal-grpo` with candle's CUDA backend on any x86-64 Linux machine, GPU or not.
#
#   bash scripts/build-cuda.sh            # -> target/cuda/release/cal-grpo
#   bash scripts/build-cuda.sh --tests    # and the GPU test binaries -> target/cuda/gpu-tests/
#   CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh   # A100 instead of H100/H200
#
# Everything comes from package registries: nvcc, its headers and the CUDA libraries the
# binary links against are NVIDIA's PyPI wheels, installed into $CUDA_PREFIX (default
# target/cuda-toolkit, 1.2 GB). The one library no wheel ships is the driver (libcuda):
# the linker gets a stub generated from the symbols cudarc declares, and at run time the
# machine's real driver is used. So the build needs no GPU, and the binary runs only
# where a driver is installed (or, to see the clear "no device" error on a machine
# without one, with LD_LIBRARY_PATH=$CUDA_PREFIX/stubs).
#
# Knobs (environment):
#   CUDA_COMPUTE_CAP  SASS target of candle's precompiled kernels; 90 (H100/H200) by default
#   CUDA_VERSION      toolkit release, 13.0 by default: PTX is JIT-compiled by the driver,
#                     which refuses PTX newer than itself, so match the oldest driver you
#                     run on (driver 580 = CUDA 13.0); 13.x only
#   CUDA_PREFIX       where the wheels go (reused when already there)
#   CARGO_TARGET_DIR  default target/cuda, so the CPU build in target/ stays as it is
#   FEATURES          extra cargo features, e.g. "openblas"
set -euo pipefail

with_tests=0
for a in "$@"; do
    case "$a" in
        --tests) with_tests=1 ;;
        *) echo "build-cuda.sh: unknown argument $a (--tests)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cap=${CUDA_COMPUTE_CAP:-90}
version=${CUDA_VERSION:-13.0}
prefix=${CUDA_PREFIX:-$root/target/cuda-toolkit}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda}
major=${version%%.*}

say() { printf '\n== %s\n' "$*"; }

# 1. The toolkit, from PyPI (CUDA 13 wheels: no -cuXX suffix, all under nvidia/cu13).
if [ "$major" -lt 13 ]; then
    echo "build-cuda.sh: CUDA $version: only the CUDA 13 wheel layout (nvidia/cu13) is supported" >&2
    exit 1
fi
wheels=()
for w in nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl \
         nvidia-cublas nvidia-cuda-nvrtc; do
    wheels+=("$w==$version.*")
done
wheels+=("nvidia-curand")
stamp="$prefix/.installed-$version"
if [ ! -f "$stamp" ]; then
    say "installing CUDA $version from PyPI into $prefix"
    python3 -m pip --version >/dev/null 2>&1 || {
        echo "build-cuda.sh: needs python3 with pip (Debian: apt-get install python3-pip)" >&2
        exit 1
    }
    rm -rf "$prefix"
    # One pip call: --target skips packages whose top-level folder (nvidia/) already
    # exists, so installing in several calls would silently drop all but the first.
    python3 -m pip install --quiet --disable-pip-version-check --target "$prefix/py" "${wheels[@]}"
    touch "$stamp"
fi

# 2. A CUDA_HOME that nvcc, cudaforge and cudarc understand: bin/, include/, lib/ (with
#    the unversioned .so names a linker wants) and lib/stubs/libcuda.so.
home="$prefix/home"
rm -rf "$home"
mkdir -p "$home/lib/stubs" "$home/include"
tk="$prefix/py/nvidia/cu$major"
ln -s "$tk/bin" "$home/bin"
ln -s "$tk/nvvm" "$home/nvvm"
for f in "$tk"/include/*; do ln -s "$f" "$home/include/"; done
libdirs=("$tk/lib")
for d in "${libdirs[@]}"; do
    for f in "$d"/lib*.so.*; do
        base=$(basename "$f")
        ln -sf "$f" "$home/lib/$base"
        ln -sf "$f" "$home/lib/${base%%.so.*}.so"
    done
done
export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home"
export PATH="$home/bin:$PATH" NVCC="$home/bin/nvcc" CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$home/lib:$home/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -2

# 3. The driver stub: every cu* entry point cudarc's driver bindings declare, as a shared
#    library named like the real one (libcuda.so.1). Each returns CUDA_ERROR_UNKNOWN
#    (999), so a run that picks the stub up fails with an error, not a crash.
say "generating the libcuda stub"
cargo fetch --quiet
cudarc=$(cargo metadata --format-version 1 --features cal-cli/cuda 2>/dev/null |
    python3 -c 'import json,sys,os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
grep -ho 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | awk '{print $4}' |
    sort -u | awk '{printf "int %s(void) { return 999; }\n", $1}' > "$home/lib/stubs/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/cuda_stub.c"
ln -sf libcuda.so "$home/lib/stubs/libcuda.so.1"
echo "$(grep -c . "$home/lib/stubs/cuda_stub.c") driver entry points from $cudarc"

# 4. The build.
features="cal-cli/cuda${FEATURES:+,$FEATURES}"
say "cargo build --release -p cal-cli --features $features (CUDA_COMPUTE_CAP=$cap, target $CARGO_TARGET_DIR)"
RUSTFLAGS="${RUSTFLAGS:-} -L native=$home/lib/stubs" \
    cargo build --release -p cal-cli --features "$features"
bin="$CARGO_TARGET_DIR/release/cal-grpo"
if [ "$with_tests" = 1 ]; then
    say "GPU test binaries (device_path, gpu) -> $CARGO_TARGET_DIR/gpu-tests"
    mkdir -p "$CARGO_TARGET_DIR/gpu-tests"
    RUSTFLAGS="${RUSTFLAGS:-} -L native=$home/lib/stubs" \
        cargo test --release --no-run -p cal-model -p cal-train --features cal-train/cuda \
        --test device_path --test gpu --message-format=json-render-diagnostics |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' |
        while read -r exe; do
            name=$(basename "$exe"); name=${name%-*}
            cp "$exe" "$CARGO_TARGET_DIR/gpu-tests/$name"
            echo "  $CARGO_TARGET_DIR/gpu-tests/$name"
        done
    # Binary and tests, stripped and xz-compressed (~28 MB): small enough to carry to a
    # GPU machine that has no Rust toolchain (64 MiB per call), unpacked by plain tar.
    bundle="$CARGO_TARGET_DIR/gpu-bundle"
    rm -rf "$bundle" && mkdir -p "$bundle"
    strip -o "$bundle/cal-grpo" "$bin"
    for t in "$CARGO_TARGET_DIR"/gpu-tests/*; do strip -o "$bundle/$(basename "$t")" "$t"; done
    tar -cf - -C "$bundle" . | xz -6 -T2 > "$CARGO_TARGET_DIR/gpu-bundle.tar.xz"
    echo "  $CARGO_TARGET_DIR/gpu-bundle.tar.xz ($(du -h "$CARGO_TARGET_DIR/gpu-bundle.tar.xz" | cut -f1)):" \
        "tar -xJf it on the GPU machine, then ./device_path; ./gpu"
fi

# 5. Smoke test without a GPU: the binary starts against the stub, and --device cuda
#    reports the missing device instead of panicking.
say "smoke test"
export LD_LIBRARY_PATH="$home/lib/stubs:$home/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$bin" --version
if out=$("$bin" generate --model tiny --prompt "2+2=" --max-new-tokens 2 --device cuda 2>&1); then
    echo "$out"
    echo "(a CUDA device answered)"
else
    echo "$out" | tail -3
    echo "$out" | grep -q "cuda:0" || { echo "build-cuda.sh: expected a clear device error" >&2; exit 1; }
fi
cat <<EOF

Built $bin (CUDA $version, sm_$cap).
On a GPU machine it needs the driver (libcuda.so.1, from the driver install) and the
CUDA $major libraries (cuBLAS, cuRAND, NVRTC); PyTorch's cu$major wheels carry the same
ones, e.g.:
  export LD_LIBRARY_PATH=\$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))'):\$LD_LIBRARY_PATH
or this prefix's copies: export LD_LIBRARY_PATH=$home/lib:\$LD_LIBRARY_PATH
EOF
