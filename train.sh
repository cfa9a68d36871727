#!/usr/bin/env bash
# Train the mask-conditioned MM-DiT with accelerate. With no arguments it trains on the embedded default
# (tiny SD3.5 pipeline + toy data, made if missing); every default can be replaced by env or flags:
#   ACCELERATE_CONFIG=configs/accelerate_single_gpu.yaml PRETRAINED=sd3.5_medium DATA_ROOT=demo \
#   VECTORS=vectors/demo NUM_CLS=6 WORK_DIR=work_dirs/demo RESOLUTION=512 bash train.sh --train_mode lora
# Extra flags go to train.py (python train.py --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEFAULT_OUT=${DEFAULT_OUT:-outputs/demo}
if [[ -z "${PRETRAINED:-}" ]]; then  # the embedded default: the demo's inputs and its training split
  DEFAULT_OUT=$DEFAULT_OUT bash scripts/prepare_default.sh
  TRAIN_FILE=${TRAIN_FILE:-train_.jsonl}
fi
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-configs/accelerate_cpu.yaml}" train.py \
  --pretrained_model_name_or_path "${PRETRAINED:-$DEFAULT_OUT/tiny_sd35}" \
  --data_root "${DATA_ROOT:-$DEFAULT_OUT/toydata}" \
  --json_file "${TRAIN_FILE:-index_.jsonl}" \
  --vectors_path "${VECTORS:-$DEFAULT_OUT/vectors}" \
  --work_dir "${WORK_DIR:-work_dirs/train}" \
  --num_cls "${NUM_CLS:-6}" \
  --resolution "${RESOLUTION:-64}" \
  --train_batch_size "${BATCH_SIZE:-8}" \
  --max_train_steps "${MAX_TRAIN_STEPS:-200}" \
  --checkpointing_steps "${CHECKPOINTING_STEPS:-100}" \
  --resume_from_checkpoint latest \
  "$@"
