#!/usr/bin/env bash
# Train the mask-conditioned MM-DiT (issue #3 fills in train.py and the accelerate configs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec "${CRFM_VENV:-.venv}/bin/python" train.py "$@"
