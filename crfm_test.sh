#!/usr/bin/env bash
# Synthesize a dataset with CRFM: --mmseg_config/--mmseg_ckpt --rectified_step 4 --num_inference_steps 23 (issue #4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec "${CRFM_VENV:-.venv}/bin/python" test.py --rectified_step 4 --num_inference_steps 23 "$@"
