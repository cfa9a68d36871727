#!/usr/bin/env bash
# Rebuild the shipped tiny SD3.5 base (crfm/toy/tiny_sd35_base) from scratch on a CPU: the unlabelled corpus, then
# the VAE fitted as an autoencoder with the edge-keeping loss (about 55 minutes on one core), then text-to-image
# pretraining of the transformer (about 50 minutes), then its second phase at the flow-matching shift 1.0 with a
# cosine-decayed learning rate (about 30 minutes), then a third, longer cosine cycle (about 50 minutes on two threads,
# 65 on one), then the VAE decoder fitted again with an adversarial patch term (about 20 minutes). Resumable: run it
# again after an interruption and it continues from the last checkpoint (a finished phase is not run again).
# Log: outputs/pretrain_base.log when run with nohup:
#   nohup bash scripts/pretrain_base.sh > outputs/pretrain_base.log 2>&1 &
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CORPUS=${CORPUS:-outputs/pretrain_corpus}
BASE=${BASE:-crfm/toy/tiny_sd35_base}
# Seed 1000: the demo and the tests draw their scenes with seeds below 1000, so no scene is shared.
[[ -f $CORPUS/index.jsonl ]] || python -m crfm.toy.toydata "$CORPUS" --num 4000 --size 128 --seed 1000 \
  --ignore_prob 0.3 --workers 2 --no_progress
# 8 latent channels and 24 + 24 text tokens (the toy prompts are short): a sharper VAE at the fine-tuning step time
# of the earlier 4-channel base (bench/results_base.md, part 3).
python -m crfm.toy.tiny "$BASE" --variant sd3.5 --vae_channels 16,32,32 --latent_channels 8 --sample_size 16 \
  --pos_embed_max_size 8 --layers 6 --heads 4 --head_dim 32 --clip_max_length 24 --max_sequence_length 24 \
  --seed 0 --pretrain_on "$CORPUS/index.jsonl" --vae_steps 8000 --vae_edge_weight 1.0 --vae_size 64 \
  --pretrain_steps 8000 --pretrain_work_dir "${WORK:-outputs/tiny_sd35_base.work}" "$@"
# Phase 2: the built shift 3.0 (SD3's, for 1024 px) trains and samples almost nothing at low noise at 64 px; shift 1.0
# does, and a cosine decay anneals (bench/results_base.md, part 4).
python -m crfm.toy.tiny "$BASE" --continue_pretraining_on "$CORPUS/index.jsonl" --pretrain_steps 8000 \
  --pretrain_lr_schedule cosine --scheduler_shift 1.0 --pretrain_work_dir "${WORK2:-outputs/tiny_sd35_base.continued}" "$@"
# Phase 3: 12000 more steps from phase 2's EMA weights, a new cosine cycle, draws of its own: the transformer was
# still learning (bench/results_base.md, part 5).
python -m crfm.toy.tiny "$BASE" --continue_pretraining_on "$CORPUS/index.jsonl" --pretrain_steps 12000 \
  --pretrain_lr_schedule cosine --scheduler_shift 1.0 --pretrain_work_dir "${WORK3:-outputs/tiny_sd35_base.phase3}" "$@"
# Then the VAE decoder alone (encoder, latent space and transformer unchanged), with the patch critic's adversarial
# term: the real images through the VAE keep more of their roads and roofs (bench/results_base.md, part 6).
python -m crfm.toy.tiny "$BASE" --refit_vae_decoder_on "$CORPUS/index.jsonl" --vae_steps 6000 --vae_edge_weight 1.0 \
  --vae_size 64 --vae_adversarial_weight 0.5 --pretrain_work_dir "${WORK4:-outputs/tiny_sd35_base.decoder}" "$@"
