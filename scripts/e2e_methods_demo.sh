#!/usr/bin/env bash
# The E2E table with the paper's competitors: SmolLM2-135M with LoRA, Adapter^H, PreLayer (prefix_layer)
# and FT^Top2 at one CPU budget (the e2e-cpu presets: 200 devset rows, one epoch, 20 test MRs, beam 5),
# bf16 compute where the CPU has it; then `loralab e2e-table` beside the paper's Table 3 rows.
#   bash scripts/e2e_methods_demo.sh [METHOD ...]   (default: lora adapter_h prefix_layer ft_top2)
# A finished run (results.json) is not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${E2E_DEMO_DIR:-runs/e2e-methods}
methods=${*:-lora adapter_h prefix_layer ft_top2}
for method in $methods; do
  preset=$([ "$method" = lora ] && echo e2e-cpu || echo "e2e-cpu-$method")
  name="e2e-cpu-$method"
  if ls "$root"/*-"$name"-*/results.json >/dev/null 2>&1; then echo "done already: $name"; continue; fi
  .venv/bin/loralab train --preset "$preset" --quiet out_dir="$root" name="$name" model.compute_dtype=auto \
    ${E2E_OVERRIDES:-}
done
.venv/bin/loralab e2e-table "$root" --out "$root"
