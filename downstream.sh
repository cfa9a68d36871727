#!/usr/bin/env bash
# Paper stage (c): train an mmseg segmentor on real data + a synthesized dataset and score it on real scenes
# (the demo's held-out test.jsonl by default, else VAL_FILE). Defaults: the demo's toy data and its CRFM-synthesized training masks (run demo.sh first).
#   DATA_ROOT=data/loveda TRAIN_FILE=train.jsonl VAL_FILE=val.jsonl SYNTH_ROOT=work_dirs/synth_crfm \
#   MMSEG_CONFIG=my_segformer.py NUM_CLS=7 bash downstream.sh --synth_ratio 0.3 --max_iters 20000
# Extra flags go to scripts/train_segmentor.py (= python -m crfm.segmentation.downstream; --help); leave SYNTH_ROOT
# empty for a real-only baseline. MMSEG_CONFIG defaults to the package's toy SegFormer.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source "${CRFM_VENV:-.venv}/bin/activate"
DEFAULT_OUT=${DEFAULT_OUT:-outputs/demo}
SYNTH_ROOT=${SYNTH_ROOT-$DEFAULT_OUT/synth_train}
synth=()
if [[ -n "$SYNTH_ROOT" ]]; then synth=(--synth_root "$SYNTH_ROOT" --synth_file "${SYNTH_FILE:-index.jsonl}"); fi
exec python scripts/train_segmentor.py --mmseg_config "${MMSEG_CONFIG:-crfm/segmentation/configs/toy_segformer.py}" \
  --data_root "${DATA_ROOT:-$DEFAULT_OUT/toydata}" --json_file "${TRAIN_FILE:-train.jsonl}" \
  --val_file "${VAL_FILE:-$([[ -z "${DATA_ROOT:-}" ]] && echo test.jsonl || echo val.jsonl)}" --work_dir "${WORK_DIR:-work_dirs/downstream}" --num_cls "${NUM_CLS:-6}" \
  "${synth[@]}" "$@"
