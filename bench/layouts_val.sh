#!/usr/bin/env bash
# Which synthetic set helps the downstream segmentor, decided on the 16 VALIDATION scenes (toydata/val.jsonl, never
# the held-out ones), per finished demo seed: real only; + the demo's filtered CRFM x3 of the labelled masks;
# + x10 of them; + 48 new layouts (crfm.data.layouts mosaics), CRFM-synthesized and filtered; + the same 48 mosaics
# cut from the real pairs (no generator). Mixed runs: 50 % synthetic draws at equal real exposure, as in the demo.
# Reads outputs/bench_demo/default/seedS (python bench/demo_runs.py); writes outputs/layouts_val/seedS/*/metrics.json
# (bench/results_layouts.md).   nohup bash bench/layouts_val.sh > outputs/layouts_val.log 2>&1 &
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-outputs/bench_demo/default}
for S in ${SEEDS:-0 1 2}; do
  D=$RUNS/seed$S; X=outputs/layouts_val/seed$S; mkdir -p "$X"
  guide=(--mmseg_config "$D/seg_real/config.py" --mmseg_ckpt "$D/seg_real/segmentor.pth")
  synth=(--pretrained_model_name_or_path "$D/tiny_sd35" --lora_ckpt "$D/train/final" --num_cls 6 --resolution 64
         --batch_size 8 --seed "$S" --no_progress --num_inference_steps 20 "${guide[@]}")
  filter=(--data_root "$D/toydata" --json_file train.jsonl "${guide[@]}" --num_cls 6 --resolution 64 --device cpu
          --no_progress --tolerance_margin 1.25)
  seg() {  # seg NAME [--synth_root DIR]: the demo's downstream recipe, scored on validation
    [ -f "$X/$1/metrics.json" ] && return
    local name=$1; shift
    python -m crfm.segmentation.downstream --mmseg_config crfm/segmentation/configs/toy_segformer.py \
      --data_root "$D/toydata" --json_file train.jsonl --val_file val.jsonl --work_dir "$X/$name" --num_cls 6 \
      --max_iters 1000 --img_size 64 --seed "$S" --device cpu ${1:+"$@" --synth_ratio 0.5 --match_real_exposure}
  }
  seg real
  seg x3 --synth_root "$D/synth_train_filtered"
  python -m crfm.data.layouts --data_root "$D/toydata" --json_file train.jsonl --work_dir "$X/layouts" \
    --num_layouts 48 --seed "$S" --no_progress
  python -m crfm.data.vectorize --pretrained_model_name_or_path "$D/tiny_sd35" --data_root "$X/layouts" \
    --json_file index.jsonl --out_json_file index_.jsonl --work_dir "$X/vectors_layouts" --max_sequence_length 32 \
    --mixed_precision no --device cpu --no_progress
  python -m crfm.sampling.synthesis "${synth[@]}" --data_root "$X/layouts" --json_file index_.jsonl \
    --vectors_path "$X/vectors_layouts" --work_dir "$X/synth_layouts" --num_per_mask 1
  python -m crfm.segmentation.filter "${filter[@]}" --synth_root "$X/synth_layouts" --work_dir "$X/synth_layouts_filtered"
  seg layouts --synth_root "$X/synth_layouts_filtered"
  python -m crfm.sampling.synthesis "${synth[@]}" --data_root "$D/toydata" --json_file train_.jsonl \
    --vectors_path "$D/vectors" --work_dir "$X/synth_x10" --num_per_mask 10
  python -m crfm.segmentation.filter "${filter[@]}" --synth_root "$X/synth_x10" --work_dir "$X/synth_x10_filtered"
  seg x10 --synth_root "$X/synth_x10_filtered"
  python -m crfm.data.layouts --data_root "$D/toydata" --json_file train.jsonl --work_dir "$X/layouts_real" \
    --num_layouts 48 --seed "$S" --with_images --no_progress
  seg mosaic --synth_root "$X/layouts_real"
done
