#!/usr/bin/env bash
# The real-scale recipe (README "Real-scale recipe", docs/recipe.md), steps 2-8 in order, as one script: the docs
# quote its commands and tests/test_recipe.py runs it on LoveDA pairs with the shipped tiny base and tiny settings,
# so the documented commands are the tested ones. Steps 0 (bash scripts/setup.sh) and 1 (the weights) come first.
# It runs in the repository root, whatever the caller's directory: relative paths are relative to the root. Every
# step resumes or skips finished work, so re-running it after a crash continues.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# knobs (environment variables); the defaults are the real-scale run on one GPU
BASE=${BASE:-sd3.5_medium}                       # the base model folder of step 1
DATA=${DATA:-data/loveda}                        # img/ and label/ with LoveDA's own ids (0 no-data, 1..7)
WORK=${WORK:-work_dirs}                          # where every step writes, one folder per step and row
DEVICE=${DEVICE:-cuda}                           # segmentors' device (train.py and test.py: accelerate's)
PRECISION=${PRECISION:-bf16}                     # text encoders, MM-DiT training and sampling (no, fp16, bf16)
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate_single_gpu.yaml}
RESOLUTION=${RESOLUTION:-512}                    # generator's image size
TRAIN_STEPS=${TRAIN_STEPS:-20000}                # MM-DiT fine-tuning steps
TRAIN_BATCH=${TRAIN_BATCH:-1}                    # its batch per GPU; 16 keeps an H100/H200 busy (bench/results_gpu.md)
CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-1000}
SEG_CONFIG=${SEG_CONFIG:-crfm/segmentation/configs/loveda_segformer_b2.py}
JUDGE_CONFIG=${JUDGE_CONFIG:-$SEG_CONFIG}        # the fidelity judge's model (trained with another seed)
SEG_ITERS=${SEG_ITERS:-40000}                    # segmentor iterations (real-only; longer with real + synthetic)
SEG_BATCH=${SEG_BATCH:-8}
SEG_FLAGS=${SEG_FLAGS:-}                         # more segmentor flags, e.g. --img_size 64
NUM_PER_MASK=${NUM_PER_MASK:-3}                  # synthetic images per training mask
SYNTH_BATCH=${SYNTH_BATCH:-4}
# shellcheck disable=SC2086  # $SEG_FLAGS is a list of flags

# 2. index: LoveDA's ids to class ids (0 no-data -> 255, 1..7 -> 0..6), prompts with the shipped class names,
#    a seeded train/val split; prints the class histogram
python -m crfm.data.make_index "$DATA" --images img --labels label --classes loveda \
  --remap 0:255,1:0,2:1,3:2,4:3,5:4,6:5,7:6 --val_fraction 0.1

# 3. prompt vectors of the training split (text encoders only)
python preprocess/vectorize.py --pretrained_model_name_or_path "$BASE" --data_root "$DATA" \
  --json_file train.jsonl --out_json_file train_.jsonl --work_dir "$WORK/vectors_train" --mixed_precision "$PRECISION"

# 4. (a) the MM-DiT with its mask branch, LoRA; resumable (re-run the same command)
ACCELERATE_CONFIG=$ACCELERATE_CONFIG PRETRAINED=$BASE DATA_ROOT=$DATA TRAIN_FILE=train_.jsonl \
  VECTORS=$WORK/vectors_train NUM_CLS=7 RESOLUTION=$RESOLUTION BATCH_SIZE=$TRAIN_BATCH MAX_TRAIN_STEPS=$TRAIN_STEPS \
  CHECKPOINTING_STEPS=$CHECKPOINTING_STEPS WORK_DIR=$WORK/loveda \
  bash train.sh --train_mode lora --lora_rank 64 --gradient_checkpointing --learning_rate 1e-4 \
  --mixed_precision "$PRECISION"

# 5. segmentors on the real training split: the CRFM guide (also the real-only row of step 7) and an independent
#    judge of mask fidelity (another seed; it never guides sampling)
python scripts/train_segmentor.py --mmseg_config "$SEG_CONFIG" --data_root "$DATA" --json_file train.jsonl \
  --val_file val.jsonl --work_dir "$WORK/seg_real" --num_cls 7 --max_iters "$SEG_ITERS" --batch_size "$SEG_BATCH" \
  --device "$DEVICE" $SEG_FLAGS
python scripts/train_segmentor.py --mmseg_config "$JUDGE_CONFIG" --data_root "$DATA" --json_file train.jsonl \
  --val_file val.jsonl --work_dir "$WORK/seg_judge" --num_cls 7 --max_iters "$SEG_ITERS" --batch_size "$SEG_BATCH" \
  --seed 1 --device "$DEVICE" $SEG_FLAGS

# 6. (b) synthesize the training masks with CRFM guided by the step-5 segmentor: test.py's defaults, and the
#    paper's setting (23 steps, the first 4 rectified) in a folder of its own
PRETRAINED=$BASE DATA_ROOT=$DATA JSON_FILE=train_.jsonl VECTORS=$WORK/vectors_train CKPT=$WORK/loveda/final \
  NUM_CLS=7 RESOLUTION=$RESOLUTION BATCH_SIZE=$SYNTH_BATCH OUT=$WORK/synth_loveda \
  MMSEG_CONFIG=$WORK/seg_real/config.py MMSEG_CKPT=$WORK/seg_real/segmentor.pth \
  bash crfm_test.sh --num_per_mask "$NUM_PER_MASK" --mixed_precision "$PRECISION" --debug
python test.py --pretrained_model_name_or_path "$BASE" --data_root "$DATA" --json_file train_.jsonl \
  --lora_ckpt "$WORK/loveda/final" --vectors_path "$WORK/vectors_train" --num_cls 7 --resolution "$RESOLUTION" \
  --num_per_mask "$NUM_PER_MASK" --mmseg_config "$WORK/seg_real/config.py" \
  --mmseg_ckpt "$WORK/seg_real/segmentor.pth" --rectified_step 4 --max_step_size 0.1 --num_rectified 1 \
  --no-l2_norm --velocity_clamp 1 --num_inference_steps 23 --mixed_precision "$PRECISION" \
  --work_dir "$WORK/synth_loveda_paper"
# mask fidelity: by the independent judge, and by the guide (inflated: CRFM lowered its loss on these images)
python -m crfm.segmentation.evaluate --data_root "$WORK/synth_loveda" --num_cls 7 \
  --mmseg_config "$WORK/seg_judge/config.py" --mmseg_ckpt "$WORK/seg_judge/segmentor.pth" \
  --out "$WORK/synth_loveda/mask_fidelity_judge.json" --device "$DEVICE"
python -m crfm.segmentation.evaluate --data_root "$WORK/synth_loveda" --num_cls 7 \
  --mmseg_config "$WORK/seg_real/config.py" --mmseg_ckpt "$WORK/seg_real/segmentor.pth" \
  --out "$WORK/synth_loveda/mask_fidelity_guide.json" --device "$DEVICE"

# 7. (c) downstream: FreeMask-filter the synthetic set with the step-5 segmentor, then step 5's recipe on real x10 +
#    synthetic, unfiltered and filtered, each row in its own work dir, at equal real exposure; scored on val.jsonl
python -m crfm.segmentation.filter --data_root "$DATA" --json_file train.jsonl --num_cls 7 \
  --mmseg_config "$WORK/seg_real/config.py" --mmseg_ckpt "$WORK/seg_real/segmentor.pth" \
  --synth_root "$WORK/synth_loveda" --work_dir "$WORK/synth_loveda_filtered" --resolution "$RESOLUTION" --views 8
DATA_ROOT=$DATA SYNTH_ROOT=$WORK/synth_loveda MMSEG_CONFIG=$SEG_CONFIG NUM_CLS=7 WORK_DIR=$WORK/seg_real_synth \
  bash downstream.sh --real_repeat 10 --match_real_exposure --max_iters "$SEG_ITERS" --batch_size "$SEG_BATCH" \
  --device "$DEVICE" $SEG_FLAGS
DATA_ROOT=$DATA SYNTH_ROOT=$WORK/synth_loveda_filtered MMSEG_CONFIG=$SEG_CONFIG NUM_CLS=7 \
  WORK_DIR=$WORK/seg_real_synth_filtered \
  bash downstream.sh --real_repeat 10 --match_real_exposure --max_iters "$SEG_ITERS" --batch_size "$SEG_BATCH" \
  --device "$DEVICE" $SEG_FLAGS

# 8. the report: contact sheet with a class legend; real only vs real + synthetic per class; mask fidelity
python -m crfm.report --synth_root "$WORK/synth_loveda" --runs "real only=$WORK/seg_real" \
  "real + CRFM=$WORK/seg_real_synth" "real + CRFM, filtered=$WORK/seg_real_synth_filtered" \
  --fidelity "$WORK/synth_loveda/mask_fidelity_judge.json" "$WORK/synth_loveda/mask_fidelity_guide.json" \
  --out "$WORK/report"
