#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (CI has no GPU; run this where one is lent):
#   1. the CUDA tests (tests/core/test_cuda.py, tests/engine/test_cuda.py, the offloaded optimizer's);
#   2. bench/gpu_qlora.py: bf16 LoRA vs loralab QLoRA vs PEFT + bitsandbytes on the GPU.
# Uses the machine's python3 and torch. Wheels in .whl/ (e.g. bitsandbytes, peft, pinned like
# pyproject's test extra) are installed into /tmp/site first, without touching the system packages.
# Logs and results go to $OUT (default /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
python3 -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/engine/test_cuda.py \
    "tests/core/test_optim.py::test_offloaded_on_gpu_equals_plain_and_state_rests_on_host" 2>&1 | tee "$OUT/pytest.log" || status=1
python3 bench/gpu_qlora.py --out "$OUT/gpu_qlora.json" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/bench.log" || status=1
exit $status
