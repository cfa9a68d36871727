#!/usr/bin/env bash
# Paper stage (c): train an mmseg segmentor on real data + a synthesized dataset and score it on real scenes
# (the demo's held-out test.jsonl by default, else VAL_FILE). Defaults: the demo's toy data and its CRFM-synthesized
# training masks (run demo.sh first).
#   DATA_ROOT=data/loveda TRAIN_FILE=train.jsonl VAL_FILE=val.jsonl SYNTH_ROOT=work_dirs/synth_crfm \
#   MMSEG_CONFIG=crfm/segmentation/configs/loveda_segformer_b2.py NUM_CLS=7 FILTER_SEG=work_dirs/seg_real \
#   bash downstream.sh --real_repeat 10 --match_real_exposure
# Extra flags go to scripts/train_segmentor.py (= python -m crfm.segmentation.downstream; --help); leave SYNTH_ROOT
# empty for a real-only baseline. MMSEG_CONFIG defaults to the package's toy SegFormer.
# FILTER_SEG=DIR (a segmentor work dir trained on the real set: config.py + segmentor.pth) first filters SYNTH_ROOT
# FreeMask-style (python -m crfm.segmentation.filter, TOLERANCE_MARGIN, default 1.25) into FILTER_OUT (default
# SYNTH_ROOT_filtered; resumable) and trains on that; the synthetic originals are not changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source "${CRFM_VENV:-.venv}/bin/activate"
DEFAULT_OUT=${DEFAULT_OUT:-outputs/demo}
SYNTH_ROOT=${SYNTH_ROOT-$DEFAULT_OUT/synth_train}
DATA_ROOT=${DATA_ROOT:-$DEFAULT_OUT/toydata}
TRAIN_FILE=${TRAIN_FILE:-train.jsonl}
NUM_CLS=${NUM_CLS:-6}
if [[ -n "${FILTER_SEG:-}" && -n "$SYNTH_ROOT" ]]; then
  FILTER_OUT=${FILTER_OUT:-${SYNTH_ROOT%/}_filtered}
  python -m crfm.segmentation.filter --data_root "$DATA_ROOT" --json_file "$TRAIN_FILE" --num_cls "$NUM_CLS" \
    --mmseg_config "$FILTER_SEG/config.py" --mmseg_ckpt "$FILTER_SEG/segmentor.pth" --synth_root "$SYNTH_ROOT" \
    --synth_file "${SYNTH_FILE:-index.jsonl}" --work_dir "$FILTER_OUT" --tolerance_margin "${TOLERANCE_MARGIN:-1.25}"
  SYNTH_ROOT=$FILTER_OUT SYNTH_FILE=index.jsonl
fi
synth=()
if [[ -n "$SYNTH_ROOT" ]]; then synth=(--synth_root "$SYNTH_ROOT" --synth_file "${SYNTH_FILE:-index.jsonl}"); fi
exec python scripts/train_segmentor.py --mmseg_config "${MMSEG_CONFIG:-crfm/segmentation/configs/toy_segformer.py}" \
  --data_root "$DATA_ROOT" --json_file "$TRAIN_FILE" \
  --val_file "${VAL_FILE:-$([[ "$DATA_ROOT" == "$DEFAULT_OUT/toydata" ]] && echo test.jsonl || echo val.jsonl)}" \
  --work_dir "${WORK_DIR:-work_dirs/downstream}" --num_cls "$NUM_CLS" "${synth[@]}" "$@"
