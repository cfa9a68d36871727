#!/usr/bin/env bash
# README's first command: set up (idempotent), then the whole pipeline on the embedded default, offline, on a
# CPU: toy scenes -> tiny SD3.5 -> vectors -> MM-DiT training -> guide/judge segmentors (mmseg) -> held-out
# masks synthesized plain and with CRFM -> mask-fidelity table -> downstream real vs real + synthetic.
# Results: outputs/demo/{summary.md,summary.json,samples.png}. A re-run reuses finished stages and resumes an
# interrupted one; --fresh starts over. Every knob is a flag: bash demo.sh --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
source "${CRFM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m crfm.toy.demo "$@"
