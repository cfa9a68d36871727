#!/usr/bin/env bash
# README's first command: set up, then run the pipeline on the embedded default, offline, on a CPU.
# Stages: toy remote-sensing dataset -> tiny SD3.5 pipeline -> prompt vectors -> MM-DiT training -> toy
# segmentor (mmseg) -> synthesis of the masks, plain and with CRFM (same seeds) -> mask-fidelity table.
# A re-run reuses what exists (training resumes from its latest checkpoint); --fresh starts over.
# Knobs (env): DEFAULT_OUT (outputs/demo), DEMO_NUM (64 scenes), DEMO_SIZE (256 px), DEMO_STEPS (300),
# DEMO_RESOLUTION (64 px for training), DEMO_SEG_ITERS (400), DEMO_VAE_STEPS (800).
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

printf '\n=== synthesize the toy masks, plain (test.sh) -> %s/synth_plain ===\n' "$DEFAULT_OUT"
CKPT="$DEFAULT_OUT/train/final" OUT="$DEFAULT_OUT/synth_plain" bash test.sh --num_inference_steps 23 --no_progress --debug

printf '\n=== synthesize with CRFM (crfm_test.sh; trains the toy segmentor first) -> %s/synth_crfm ===\n' "$DEFAULT_OUT"
CKPT="$DEFAULT_OUT/train/final" OUT="$DEFAULT_OUT/synth_crfm" SEG_DIR="$DEFAULT_OUT/segmentor" \
  SEG_ITERS="${DEMO_SEG_ITERS:-400}" bash crfm_test.sh --no_progress --debug

printf '\n=== mask fidelity: the toy segmentor on the synthesized images vs their masks ===\n'
source "${CRFM_VENV:-.venv}/bin/activate"
for kind in plain crfm; do
  echo "--- $kind"
  python -m crfm.evaluate --data_root "$DEFAULT_OUT/synth_$kind" --mmseg_config configs/mmseg/toy_segformer.py \
    --mmseg_ckpt "$DEFAULT_OUT/segmentor/segmentor.pth" --num_cls 6 --no_progress 2>&1 | grep -v "^wrote"
done

printf '\n=== summary ===\n'
echo "pipeline  : $DEFAULT_OUT/tiny_sd35"
echo "dataset   : $DEFAULT_OUT/toydata ($(wc -l < "$DEFAULT_OUT/toydata/index.jsonl") pairs)"
echo "vectors   : $DEFAULT_OUT/vectors"
echo "training  : $(cat "$DEFAULT_OUT/train/summary.json" | tr -d '\n ')"
echo "loss curve: $DEFAULT_OUT/train/loss_curve.png"
echo "synthesis : $DEFAULT_OUT/synth_plain, $DEFAULT_OUT/synth_crfm (index.jsonl, img/, label/, debug/)"
echo "fidelity  : $DEFAULT_OUT/synth_plain/mask_fidelity.json, $DEFAULT_OUT/synth_crfm/mask_fidelity.json"
echo "time      : $((SECONDS - start)) s"
