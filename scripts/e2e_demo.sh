#!/usr/bin/env bash
# The E2E NLG demonstration: SmolLM2-135M with the paper's LoRA settings (r=4, alpha=32, dropout 0.1 on
# q_proj and v_proj) trained on a subset of devset.csv, then 100 test MRs decoded with the paper's
# decoding (beam 10, length penalty 0.9, no repeated 4-grams, at most 64 new tokens) and scored with the
# official metrics; the run's baseline (results.json) is the same 100 MRs decoded by the base model.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${E2E_DEMO_DIR:-runs/e2e-demo}
common=(out_dir="$root" data.train_samples=${E2E_TRAIN_ROWS:-240} data.eval_samples=100
        generate.num_beams=10 generate.max_new_tokens=64 generate.batch_size=10)
.venv/bin/loralab train --preset e2e-cpu --quiet name=e2e-demo "${common[@]}"
