#!/usr/bin/env bash
# Build benchmarks/gpu_wheels/: what benchmarks/gpu_suite.py installs on a GPU machine without network
# (it has torch, transformers, accelerate and peft; it lacks TransformerLens, reftlens and the modules
# TransformerLens imports). Run on a machine with PyPI access, then copy the folder with the checkout.
#
#   bash benchmarks/make_gpu_bundle.sh                 # wheels for this machine's Python
#   GPU_PYTHON=3.12 bash benchmarks/make_gpu_bundle.sh # for another Python on the GPU machine
#
# gpu_suite.py installs only the wheels whose distribution is not installed already (never replacing
# the image's torch, transformers, numpy, ...), with pip --no-index --no-deps. Limit: 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/gpu_wheels
PY=${GPU_PYTHON:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
# TransformerLens 4.3 and what `import transformer_lens` + its bridge + transformer_lens.patching import
# that a torch/transformers/peft image does not have (found with sys.modules after loading a model).
# Not `datasets`: it needs pyarrow (55 MB, over the limit with the rest); TransformerLens imports only
# three names from it at load time, and gpu_suite.py gives this process placeholders for them.
PKGS=(
  transformer-lens==4.3.0 einops jaxtyping wadler-lindig
  pandas python-dateutil six tzdata
  rich markdown-it-py mdurl pygments sentencepiece protobuf
)
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp -d "$OUT.tmp" "${PKGS[@]}"
python3 -m pip wheel --quiet --no-deps -w "$OUT.tmp" .   # reftlens itself (the suite prefers the checkout's source)
size=$(du -sm "$OUT.tmp" | cut -f1)
ls -1 "$OUT.tmp"
echo "total: ${size} MiB (Python $PY)"
if [ "$size" -gt 64 ]; then
  echo "over the 64 MiB limit" >&2
  exit 1
fi
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "wrote $OUT"
