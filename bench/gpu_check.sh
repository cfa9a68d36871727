#!/usr/bin/env bash
# One GPU check of crfm at SD3.5-medium size (training step, memory, TFLOP/s, MFU; sampling speed): see
# bench/gpu_check.py. On a CUDA machine: `bash bench/gpu_check.sh` writes bench/results_gpu.md (277 s on one
# H200). Anywhere: `bash bench/gpu_check.sh --smoke --out FILE` runs the same code on the CPU at small sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=1
exec "$PYTHON" bench/gpu_check.py "$@"
