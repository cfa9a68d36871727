#!/usr/bin/env bash
# Make the embedded default inputs if they are missing, exactly as the demo makes them: toy scenes with
# labelled/validation/held-out splits, the base (a copy of the shipped pretrained tiny SD3.5) and prompt vectors,
# in $DEFAULT_OUT (outputs/demo). Used by train.sh when no PRETRAINED is given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m crfm.toy.demo --out "${DEFAULT_OUT:-outputs/demo}" --until vectors
