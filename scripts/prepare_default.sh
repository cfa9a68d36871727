#!/usr/bin/env bash
# Make the embedded default inputs if they are missing, exactly as the demo makes them: toy scenes with a
# train/held-out split, the tiny SD3.5 pipeline (VAE fitted to the toy images) and prompt vectors, in
# $DEFAULT_OUT (outputs/demo). Used by train.sh when no PRETRAINED is given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m crfm.demo --out "${DEFAULT_OUT:-outputs/demo}" --until vectors
