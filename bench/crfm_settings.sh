#!/usr/bin/env bash
# Which CRFM settings help the demo's generator? Chooses test.py's CRFM defaults on the demo's *validation* split
# (never the held-out one). Runs on a finished demo (bash demo.sh): its generator, its guide segmentor (seg_real,
# drives CRFM) and its judge (seg_judge, only grades), the validation masks, the same noise for every row.
#   bash bench/crfm_settings.sh [DEMO_OUT=outputs/demo]   -> $OUT/bench_crfm/<setting>/ and a table on stdout
#   SETTINGS=plain bash bench/crfm_settings.sh DEMO_OUT     -> only the named rows (e.g. to compare generators)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O=${1:-outputs/demo}
RES=$(python -c "import json; print(json.load(open('$O/demo_settings.json'))['resolution'])")
STEPS=$(python -c "import json; print(json.load(open('$O/demo_settings.json'))['num_inference_steps'])")
score() {  # $1 data root, $2 index -> "guide judge" mIoU (%)
  for seg in seg_real seg_judge; do
    python -m crfm.segmentation.evaluate --data_root "$1" --json_file "$2" --mmseg_config "$O/$seg/config.py" \
      --mmseg_ckpt "$O/$seg/segmentor.pth" --num_cls 6 --resolution "$RES" --no_progress --out "$1/fidelity_$seg.json" \
      2> /dev/null | sed -n 's/.*\*\*mIoU\*\* | \*\*\([0-9.]*\)\*\*.*/\1/p'
  done | paste -sd' '
}
run() {  # $1 name, rest: flags of test.py; with --rectified_step (CRFM) the guide segmentor is added
  name=$1; shift
  [[ " ${SETTINGS:-$name} " == *" $name "* ]] || return 0  # SETTINGS="plain paper": only those rows
  local seg=()
  if [[ " $* " == *" --rectified_step "* ]]; then seg=(--mmseg_config "$O/seg_real/config.py" --mmseg_ckpt "$O/seg_real/segmentor.pth"); fi
  python test.py --pretrained_model_name_or_path "$O/tiny_sd35" --data_root "$O/toydata" --json_file val_.jsonl \
    --vectors_path "$O/vectors" --lora_ckpt "$O/train/final" --num_cls 6 --resolution "$RES" --batch_size 8 \
    --num_inference_steps "$STEPS" --work_dir "$O/bench_crfm/$name" --no_progress "${seg[@]}" "$@" > /dev/null 2>&1
  echo "| $name | $* | $(score "$O/bench_crfm/$name" index.jsonl | sed 's/ / | /') |"
}
echo "| setting | test.py flags | guide mIoU | judge mIoU |"
echo "|---|---|---|---|"
echo "| real validation images | | $(score "$O/toydata" val.jsonl | sed 's/ / | /') |"
run plain
run plain_10_steps --num_inference_steps 10
run plain_40_steps --num_inference_steps 40
run plain_cfg3 --guidance_scale 3
run paper --rectified_step 4 --max_step_size 0.1 --num_rectified 1 --no-l2_norm --velocity_clamp 1
run paper_no_clamp --rectified_step 4 --max_step_size 0.1 --num_rectified 1 --no-l2_norm --velocity_clamp 0
run l2_s3_r8 --rectified_step 8 --max_step_size 3 --num_rectified 1 --l2_norm --velocity_clamp 0
run l2_s10_r8_n3 --rectified_step 8 --max_step_size 10 --num_rectified 3 --l2_norm --velocity_clamp 0
run l2_s10_r12_n3 --rectified_step 12 --max_step_size 10 --num_rectified 3 --l2_norm --velocity_clamp 0
run l2_s30_r8_n3 --rectified_step 8 --max_step_size 30 --num_rectified 3 --l2_norm --velocity_clamp 0
run l2_s30_r12_n3 --rectified_step 12 --max_step_size 30 --num_rectified 3 --l2_norm --velocity_clamp 0
run l2_s100_r8_n3 --rectified_step 8 --max_step_size 100 --num_rectified 3 --l2_norm --velocity_clamp 0
