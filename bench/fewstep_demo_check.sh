#!/bin/bash
# The demo few-step stage's settings (2 pairs/mask, 4 segments, 400 steps) on bench_demo seed 0, scored on the
# validation masks (run after bench/demo_runs.py; log: outputs/fewstep/demo_check/log).
set -e
mkdir -p outputs/fewstep/demo_check
D=outputs/bench_demo/default/seed0; W=outputs/fewstep/demo_check
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
C="--pretrained_model_name_or_path $D/tiny_sd35 --data_root $D/toydata --vectors_path $D/vectors --num_cls 6 --resolution 64 --no_progress"
.venv/bin/python -m crfm.reflow $C --lora_ckpt $D/train/final --json_file train_.jsonl --work_dir $W/pairs --num_per_mask 2 --num_inference_steps 20 --sigma_grid uniform --segments 4 --seed 0 --batch_size 8 --mmseg_config $D/seg_real/config.py --mmseg_ckpt $D/seg_real/segmentor.pth
.venv/bin/python -m crfm.training.train $C --work_dir $W/student --reflow_pairs $W/pairs --init_ckpt $D/train/final --report_to none --seed 0 --max_train_steps 400 --learning_rate 1e-4 --train_batch_size 8 --prompt_dropout 0 --use_ema --ema_decay 0.995 --checkpointing_steps 100 --checkpoints_total_limit 1 --resume_from_checkpoint latest --seqrf_segments 4
.venv/bin/python -m crfm.evaluate_sampling $C --lora_ckpt $W/student/final --json_file val_.jsonl --judge_config $D/seg_judge/config.py --judge_ckpt $D/seg_judge/segmentor.pth --runs euler:1:uniform euler:2:uniform euler:4:uniform --work_dir $W/eval_val --seed 0 --device cpu --straightness_segments
