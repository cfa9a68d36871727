#!/usr/bin/env bash
# README's first command: set up, then run the pipeline on the embedded default, offline, on a CPU.
# Stages done so far: tiny SD3.5 pipeline -> toy remote-sensing dataset -> prompt vectors.
# A re-run reuses what exists; --fresh rebuilds everything. Knobs (env): DEMO_OUT, DEMO_NUM, DEMO_SIZE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OUT=${DEMO_OUT:-outputs/demo}
NUM=${DEMO_NUM:-64}
SIZE=${DEMO_SIZE:-256}
if [[ "${1:-}" == "--fresh" ]]; then rm -rf "$OUT"; fi

bash scripts/setup.sh
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
stage() { printf '\n=== %s ===\n' "$*"; }
start=$SECONDS

stage "1/3 tiny SD3.5 pipeline (random weights, diffusers layout) -> $OUT/tiny_sd35"
if [[ -f "$OUT/tiny_sd35/model_index.json" ]]; then echo "exists, reused"; else python -m crfm.tiny "$OUT/tiny_sd35"; fi

stage "2/3 toy remote-sensing dataset: $NUM scenes of $SIZE px -> $OUT/toydata"
if [[ -f "$OUT/toydata/index.jsonl" ]] && [[ $(wc -l < "$OUT/toydata/index.jsonl") -eq $NUM ]]; then
  echo "exists, reused"
else
  python -m crfm.toydata "$OUT/toydata" --num "$NUM" --size "$SIZE" --seed 0 --workers 2
fi

stage "3/3 prompt vectors (SD3 encode_prompt, resumable) -> $OUT/vectors"
python preprocess/vectorize.py --pretrained_model_name_or_path "$OUT/tiny_sd35" --data_root "$OUT/toydata" \
  --src_json_file index.jsonl --out_json_file index_.jsonl --work_dir "$OUT/vectors" \
  --mixed_precision no --device cpu

stage "summary"
echo "pipeline  : $OUT/tiny_sd35"
echo "dataset   : $OUT/toydata ($(wc -l < "$OUT/toydata/index.jsonl") pairs, classes in $OUT/toydata/classes.json)"
echo "vectors   : $OUT/vectors ($(find "$OUT/vectors" -name '*.safetensors' | wc -l) files), index $OUT/toydata/index_.jsonl"
echo "time      : $((SECONDS - start)) s"
echo "next      : training (train.sh, issue #3) and CRFM synthesis (crfm_test.sh, issue #4) are not implemented yet."
