#!/usr/bin/env bash
# Builds a separate virtual environment with pyreft 0.1.0 + pyvene 0.1.8 for side-by-side
# benchmarks. They pin transformers==4.45.1, which must never meet reftlens' transformers 5.x,
# hence a venv of their own. Idempotent: does nothing when the venv already imports pyreft.
#
#   bash benchmarks/peers/setup_pyreft_env.sh            # -> $PYREFT_VENV or .bench/venv-pyreft in the repository
#   PYREFT_VENV=/tmp/pyreft bash benchmarks/peers/setup_pyreft_env.sh
set -euo pipefail

VENV="${PYREFT_VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.bench/venv-pyreft}"
# torch==2.13.0 resolves to the CPU wheel kept on local disk here; a bare `torch` could pull a
# multi-GB CUDA build. Override elsewhere, e.g. TORCH_SPEC=torch.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="$VENV/bin/python"

check() { HF_HUB_OFFLINE=1 "$PY" -c "import psutil, pyreft, pyvene, transformers, torch; assert transformers.__version__ == '4.45.1'" >/dev/null 2>&1; }

if [ -x "$PY" ] && check; then
    echo "pyreft venv already works: $VENV"
    exit 0
fi

python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q "transformers==4.45.1" accelerate datasets sentencepiece protobuf matplotlib psutil  # psutil: RSS in pyreft_bench
# --no-deps: their declared requirements drag in a long list (e.g. flash-attn style extras,
# pinned numpy/torch) that is not needed for ReFT training and generation. What they do import
# at run time is listed after them.
"$PY" -m pip install -q --no-deps "pyreft==0.1.0" "pyvene==0.1.8"
# What they import at run time beyond the above: networkx (comes with torch), matplotlib, tqdm,
# huggingface_hub (with transformers). nnsight is optional (pyvene prints a notice without it);
# seaborn is only for pyvene.analyses.visualization, which the benchmarks do not use.

check || { echo "pyreft venv at $VENV does not import; see errors above" >&2; HF_HUB_OFFLINE=1 "$PY" -c "import pyreft"; exit 1; }
echo "pyreft venv ready: $VENV"
"$PY" -c "import torch, transformers, pyreft, pyvene; from importlib.metadata import version as v; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyreft', v('pyreft'), 'pyvene', v('pyvene'))"
