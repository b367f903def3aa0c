#!/usr/bin/env bash
# Keep the evidence of finished runs in the repository: each run's results.json, config.yaml and env.json
# (a few KB; no weights), copied from a run store to DEST/<run dir name>/. The table commands read DEST
# as they read the store (`loralab glue-table DEST`, `loralab e2e-table DEST`).
#   bash scripts/keep_results.sh RUNS_DIR DEST
set -euo pipefail
src=${1:?usage: keep_results.sh RUNS_DIR DEST}
dest=${2:?usage: keep_results.sh RUNS_DIR DEST}
kept=0
for run in "$src"/*/; do
  [ -f "$run/results.json" ] || continue
  out="$dest/$(basename "$run")"
  mkdir -p "$out"
  for f in results.json config.yaml env.json; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$out/"; fi
  done
  kept=$((kept + 1))
done
echo "kept $kept finished runs of $src in $dest"
