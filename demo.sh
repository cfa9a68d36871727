#!/usr/bin/env bash
# README's first command: set up, then run the pipeline on the embedded default, offline, on a CPU.
# Stages done so far: tiny SD3.5 pipeline -> toy remote-sensing dataset -> prompt vectors -> MM-DiT training.
# A re-run reuses what exists (training resumes from its latest checkpoint); --fresh starts over.
# Knobs (env): DEFAULT_OUT (outputs/demo), DEMO_NUM (64 scenes), DEMO_SIZE (256 px), DEMO_STEPS (300),
# DEMO_RESOLUTION (64 px for training).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export DEFAULT_OUT=${DEFAULT_OUT:-outputs/demo}
if [[ "${1:-}" == "--fresh" ]]; then rm -rf "$DEFAULT_OUT"; fi
start=$SECONDS

bash scripts/setup.sh
bash scripts/prepare_default.sh

printf '\n=== train the mask-conditioned MM-DiT (full mode) -> %s/train ===\n' "$DEFAULT_OUT"
PRETRAINED="$DEFAULT_OUT/tiny_sd35" DATA_ROOT="$DEFAULT_OUT/toydata" VECTORS="$DEFAULT_OUT/vectors" \
  WORK_DIR="$DEFAULT_OUT/train" MAX_TRAIN_STEPS="${DEMO_STEPS:-300}" RESOLUTION="${DEMO_RESOLUTION:-64}" \
  bash train.sh

printf '\n=== summary ===\n'
echo "pipeline  : $DEFAULT_OUT/tiny_sd35"
echo "dataset   : $DEFAULT_OUT/toydata ($(wc -l < "$DEFAULT_OUT/toydata/index.jsonl") pairs)"
echo "vectors   : $DEFAULT_OUT/vectors"
echo "training  : $(cat "$DEFAULT_OUT/train/summary.json" | tr -d '\n ')"
echo "loss curve: $DEFAULT_OUT/train/loss_curve.png"
echo "time      : $((SECONDS - start)) s"
echo "next      : CRFM synthesis (crfm_test.sh, issue #4) is not implemented yet."
