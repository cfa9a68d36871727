#!/usr/bin/env bash
# Make the embedded default inputs if they are missing: toy dataset, tiny SD3.5 pipeline, prompt vectors.
# Used by demo.sh and train.sh. Env: DEFAULT_OUT (outputs/demo), DEMO_NUM (64), DEMO_SIZE (256),
# DEMO_VAE_STEPS (800).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${DEFAULT_OUT:-outputs/demo}
NUM=${DEMO_NUM:-64}
SIZE=${DEMO_SIZE:-256}
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
stage() { printf '\n=== %s ===\n' "$*"; }

stage "toy remote-sensing dataset: $NUM scenes of $SIZE px -> $OUT/toydata"
if [[ -f "$OUT/toydata/index.jsonl" ]] && [[ $(wc -l < "$OUT/toydata/index.jsonl") -eq $NUM ]]; then
  echo "exists, reused"
else
  python -m crfm.toydata "$OUT/toydata" --num "$NUM" --size "$SIZE" --seed 0 --workers 2
fi

stage "tiny SD3.5 pipeline (random MM-DiT and text encoders, VAE fitted to the toy images) -> $OUT/tiny_sd35"
if [[ -f "$OUT/tiny_sd35/model_index.json" ]]; then
  echo "exists, reused"
else
  python -m crfm.tiny "$OUT/tiny_sd35.tmp" --fit-vae-on "$OUT/toydata/index.jsonl" --vae-steps "${DEMO_VAE_STEPS:-800}" \
    --vae-size 64
  rm -rf "$OUT/tiny_sd35" && mv "$OUT/tiny_sd35.tmp" "$OUT/tiny_sd35"  # complete or absent
fi

stage "prompt vectors (SD3 encode_prompt, resumable) -> $OUT/vectors"
python preprocess/vectorize.py --pretrained_model_name_or_path "$OUT/tiny_sd35" --data_root "$OUT/toydata" \
  --src_json_file index.jsonl --out_json_file index_.jsonl --work_dir "$OUT/vectors" \
  --mixed_precision no --device cpu --no_progress
