#!/usr/bin/env bash
# README's test command: set up (idempotent), lint, then the whole test suite, offline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
ruff format --check .
python -m pytest "$@"
