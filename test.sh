#!/usr/bin/env bash
# Synthesize a dataset without CRFM (issue #4 fills in test.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec "${CRFM_VENV:-.venv}/bin/python" test.py "$@"
