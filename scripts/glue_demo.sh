#!/usr/bin/env bash
# The GLUE demonstration: MiniLM-L6 on SST-2, MRPC, STS-B and RTE with LoRA, full fine-tuning and BitFit
# (CPU presets, one seed), then the table beside the paper's numbers. One `loralab train` per run.
# Two shells can share the work: `bash scripts/glue_demo.sh sst2 rte` and `bash scripts/glue_demo.sh mrpc stsb`.
# Usage: bash scripts/glue_demo.sh [TASK ...]     (default: sst2 mrpc stsb rte)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${GLUE_DEMO_DIR:-runs/glue-demo}
tasks=${*:-sst2 mrpc stsb rte}
for task in $tasks; do
  for method in "" -full -bitfit; do
    .venv/bin/loralab train --preset "glue-cpu-${task}${method}" --quiet out_dir="$root"
  done
done
.venv/bin/loralab glue-table "$root" --out "$root"
