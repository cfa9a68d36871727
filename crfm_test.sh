#!/usr/bin/env bash
# Synthesize with CRFM at test.py's defaults (chosen on the demo's validation split) with a frozen mmseg segmentor;
# the paper's scripts' setting is: --rectified_step 4 --max_step_size 0.1 --num_rectified 1 --no-l2_norm
# --velocity_clamp 1 --num_inference_steps 23 (append those flags to use it). Defaults as test.sh; the segmentor defaults to the small toy SegFormer, trained with mmseg's Runner
# on the toy data if it is missing. Bring your own: MMSEG_CONFIG=... MMSEG_CKPT=... bash crfm_test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source "${CRFM_VENV:-.venv}/bin/activate"
DEFAULT_OUT=${DEFAULT_OUT:-outputs/demo}
if [[ -z "${MMSEG_CKPT:-}" ]]; then
  # The demo's guide segmentor if the demo ran, else the toy SegFormer trained here on the toy training split.
  if [[ -z "${SEG_DIR:-}" && -f "$DEFAULT_OUT/seg_real/segmentor.pth" ]]; then SEG_DIR=$DEFAULT_OUT/seg_real; fi
  SEG_DIR=${SEG_DIR:-work_dirs/toy_segmentor}
  MMSEG_CKPT=$SEG_DIR/segmentor.pth
  if [[ ! -f "$MMSEG_CKPT" ]]; then
    echo "=== training the toy segmentor (mmseg Runner) -> $SEG_DIR ==="
    python scripts/train_segmentor.py --mmseg_config "${MMSEG_CONFIG:-crfm/segmentation/configs/toy_segformer.py}" \
      --data_root "${DATA_ROOT:-$DEFAULT_OUT/toydata}" --json_file train.jsonl --val_file val.jsonl \
      --work_dir "$SEG_DIR" --num_cls "${NUM_CLS:-6}" --max_iters "${SEG_ITERS:-400}" --img_size 64
  fi
  MMSEG_CONFIG=${MMSEG_CONFIG:-$SEG_DIR/config.py}  # the merged config the checkpoint was trained with
fi
MMSEG_CONFIG=${MMSEG_CONFIG:-crfm/segmentation/configs/toy_segformer.py}
OUT=${OUT:-work_dirs/synth_crfm} exec bash test.sh --mmseg_config "$MMSEG_CONFIG" --mmseg_ckpt "$MMSEG_CKPT" \
  "$@"
