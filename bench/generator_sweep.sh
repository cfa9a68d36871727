#!/usr/bin/env bash
# Where the generator's mask-following is lost, and the fine-tuning settings the demo uses (issue #17, item 4):
# bench/results_generator.md. Fine-tunes the generator of one demo run (its base, 16 labelled scenes and vectors)
# with a few settings, draws 2 images for each of the 16 *validation* masks (never the held-out ones) and scores
# them with that run's judge. Resumable: finished fine-tunings and syntheses are reused.
#   RUN=outputs/bench_demo/flips_only/seed0 bash bench/generator_sweep.sh       (~1 h on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
RUN=${RUN:-outputs/bench_demo/flips_only/seed0}  # any finished demo run: only its inputs and judge are read
OUT=${OUT:-outputs/generator_sweep}
mkdir -p "$OUT"

finetune() {  # NAME LEARNING_RATE [train.py flags]: 1500 steps at a constant rate (no warm-up), a checkpoint every 375
  local name=$1 lr=$2
  shift 2
  python -m crfm.training.train --pretrained_model_name_or_path "$RUN/tiny_sd35" --data_root "$RUN/toydata" \
    --json_file train_.jsonl --vectors_path "$RUN/vectors" --work_dir "$OUT/ft_$name" --mask_encoding onehot \
    --num_cls 6 --resolution 64 --train_batch_size 8 --max_train_steps 1500 --learning_rate "$lr" \
    --lr_warmup_steps 0 --checkpointing_steps 375 --checkpoints_total_limit 8 --resume_from_checkpoint latest \
    --seed 0 --no_progress "$@" > "$OUT/ft_$name.log" 2>&1
}

score() {  # NAME INDEX CHECKPOINT [test.py flags]: synthesize, then the judge's mIoU and per-class IoU
  local name=$1 index=$2 ckpt=$3 work=$OUT/syn_$1
  shift 3
  [[ -f $work/judge.json ]] || {
    python -m crfm.sampling.synthesis --pretrained_model_name_or_path "$RUN/tiny_sd35" --data_root "$RUN/toydata" \
      --json_file "$index" --vectors_path "$RUN/vectors" --lora_ckpt "$ckpt" --work_dir "$work" --num_cls 6 \
      --resolution 64 --batch_size 8 --seed 0 --num_inference_steps 20 --no_progress "$@" > "$work.log" 2>&1
    python -m crfm.segmentation.evaluate --data_root "$work" --json_file index.jsonl --num_cls 6 --device cpu \
      --mmseg_config "$RUN/seg_judge/config.py" --mmseg_ckpt "$RUN/seg_judge/segmentor.pth" --no_progress \
      --out "$work/judge.json" >> "$work.log" 2>&1
  }
  python -c "import json, sys; r = json.load(open(sys.argv[2])); \
print('|', sys.argv[1], '|', ' | '.join(f'{100 * v:.1f}' for v in r['IoU']), '|', f\"{100 * r['mIoU']:.2f}\", '|')" \
    "$name" "$work/judge.json"
}

finetune flips_lr5e-4 5e-4 &                       # the previous demo default: horizontal flips only
finetune rot90_lr5e-4 5e-4 --rot90                 # + quarter turns: 8 views of each pair
wait
finetune rot90_lora_lr5e-4 5e-4 --rot90 --train_mode lora &
finetune rot90_lr1e-3 1e-3 --rot90
wait

echo "| run | soil | farmland | forest | water | road | building | mIoU |"
echo "|---|---|---|---|---|---|---|---|"
# The real validation images at the generator's resolution: what a perfect generator would score.
[[ -f $OUT/real_val.json ]] || python -m crfm.segmentation.evaluate --data_root "$RUN/toydata" --json_file val.jsonl \
  --num_cls 6 --resolution 64 --device cpu --mmseg_config "$RUN/seg_judge/config.py" \
  --mmseg_ckpt "$RUN/seg_judge/segmentor.pth" --no_progress --out "$OUT/real_val.json" > /dev/null 2>&1
python -c "import json, sys; r = json.load(open(sys.argv[1])); \
print('| real validation images |', ' | '.join(f'{100 * v:.1f}' for v in r['IoU']), '|', f\"{100 * r['mIoU']:.2f}\", '|')" \
  "$OUT/real_val.json"
for name in flips_lr5e-4 rot90_lr5e-4 rot90_lora_lr5e-4 rot90_lr1e-3; do
  for step in 375 750 1125 1500; do
    score "${name}_val_$step" val_.jsonl "$OUT/ft_$name/checkpoints/checkpoint-$step" --num_per_mask 2
  done
done
# Memorisation: the same generators on the 16 masks they were fine-tuned on (1 image each).
score flips_lr5e-4_train_1500 train_.jsonl "$OUT/ft_flips_lr5e-4/checkpoints/checkpoint-1500"
score rot90_lr5e-4_train_1500 train_.jsonl "$OUT/ft_rot90_lr5e-4/checkpoints/checkpoint-1500"
# Classifier-free guidance (text) and CRFM with the run's guide, validation masks.
for g in 3 5; do
  score "rot90_lr1e-3_val_1500_cfg$g" val_.jsonl "$OUT/ft_rot90_lr1e-3/checkpoints/checkpoint-1500" \
    --num_per_mask 2 --guidance_scale "$g"
done
score rot90_lr1e-3_val_1500_crfm val_.jsonl "$OUT/ft_rot90_lr1e-3/checkpoints/checkpoint-1500" --num_per_mask 2 \
  --mmseg_config "$RUN/seg_real/config.py" --mmseg_ckpt "$RUN/seg_real/segmentor.pth"
