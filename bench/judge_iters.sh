#!/usr/bin/env bash
# The demo's judge (toy_unet.py) at 1000 vs 2000 iterations, per demo seed, scored on the judge's *own* validation
# scenes (toydata_judge/val.jsonl: another seed's scenes, never the held-out ones): does every class reach >= 25 IoU?
# Reads the judge data of finished demo runs; writes outputs/judge_iters/seedS/metrics.json (bench/results_judge.md).
#   nohup bash bench/judge_iters.sh 2000 > outputs/judge_iters.log 2>&1 &
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
ITERS=${1:-2000}
RUNS=${RUNS:-outputs/bench_demo/default}
for seed in ${SEEDS:-1 2 0}; do
  # The demo trains its judge with seed + 1 (Demo.real_data_runs).
  python -m crfm.segmentation.downstream --mmseg_config crfm/segmentation/configs/toy_unet.py \
    --data_root "$RUNS/seed$seed/toydata_judge" --json_file train.jsonl --val_file val.jsonl \
    --work_dir "outputs/judge_iters/iters$ITERS/seed$seed" --num_cls 6 --max_iters "$ITERS" --img_size 64 \
    --seed $((seed + 1)) --device cpu
done
