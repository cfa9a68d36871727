#!/usr/bin/env bash
# Synthesize a dataset from masks with the trained MM-DiT, CRFM off. With no arguments it uses the embedded
# default (tiny SD3.5 + toy data + the checkpoint `bash train.sh` writes); env or flags replace any of it:
#   PRETRAINED=sd3.5_medium DATA_ROOT=demo VECTORS=vectors/demo CKPT=work_dirs/demo/final NUM_CLS=6 \
#   RESOLUTION=512 OUT=work_dirs/synth bash test.sh --num_per_mask 4 --debug
# Extra flags go to test.py (python test.py --help). More processes: LAUNCH="accelerate launch --config_file X".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEFAULT_OUT=${DEFAULT_OUT:-outputs/demo}
CKPT=${CKPT:-work_dirs/train/final}
# The embedded default synthesizes the demo's held-out masks; otherwise the vectorized index.
JSON_FILE=${JSON_FILE:-$([[ -z "${DATA_ROOT:-}" ]] && echo test_.jsonl || echo index_.jsonl)}
if [[ ! -f "$CKPT/crfm_checkpoint.json" ]]; then
  echo "error: no trained checkpoint at $CKPT: run 'bash train.sh' first, or set CKPT=<train work_dir>/final" >&2
  exit 2
fi
exec ${LAUNCH:-python} test.py \
  --pretrained_model_name_or_path "${PRETRAINED:-$DEFAULT_OUT/tiny_sd35}" \
  --data_root "${DATA_ROOT:-$DEFAULT_OUT/toydata}" \
  --json_file "$JSON_FILE" \
  --vectors_path "${VECTORS:-$DEFAULT_OUT/vectors}" \
  --lora_ckpt "$CKPT" \
  --num_cls "${NUM_CLS:-6}" \
  --resolution "${RESOLUTION:-64}" \
  --batch_size "${BATCH_SIZE:-4}" \
  --work_dir "${OUT:-work_dirs/synth_plain}" \
  "$@"
