#!/usr/bin/env bash
# Idempotent set-up of crfm in ./.venv: torch, requirements.txt, mmcv 2.1.0 with compiled ops, crfm itself.
# A second run returns in about a second once nothing it installs has changed.
#   CRFM_VENV=.venv                   where the virtual environment lives
#   CRFM_TORCH_SPEC=torch==2.13.0     which torch to install first (kept if torch is already there)
#   CRFM_TORCH_INDEX=URL              e.g. https://download.pytorch.org/whl/cpu on a CPU machine without a local wheel
#   CRFM_WITH_XFORMERS=1              also install xformers (CUDA only)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${CRFM_VENV:-.venv}
TORCH_SPEC=${CRFM_TORCH_SPEC:-torch==2.13.0}
MMCV_SPEC=mmcv==2.1.0
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

# Everything that decides what gets installed; a change to any of it re-runs the install steps.
fingerprint=$( { cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh; echo "$TORCH_SPEC ${CRFM_TORCH_INDEX:-} ${CRFM_WITH_XFORMERS:-}"; } | sha256sum | cut -c1-16)
stamp="$VENV/.crfm-setup-done"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]] && "$VENV/bin/python" -c \
    "import importlib.util as u; assert all(u.find_spec(m) for m in ('crfm', 'mmseg', 'mmcv._ext'))" 2>/dev/null; then
  log "environment $VENV is up to date"
  exit 0
fi

start=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip

if python -c "import torch" 2>/dev/null; then
  log "torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
  log "installing $TORCH_SPEC (before anything that depends on torch)"
  if [[ -n "${CRFM_TORCH_INDEX:-}" ]]; then
    python -m pip install -q "$TORCH_SPEC" --index-url "$CRFM_TORCH_INDEX"
  else
    python -m pip install -q "$TORCH_SPEC"
  fi
fi

log "installing requirements.txt and requirements-dev.txt"
python -m pip install -q -r requirements.txt -r requirements-dev.txt

if python -c "import mmcv.ops" 2>/dev/null; then
  log "mmcv $(python -c 'import mmcv; print(mmcv.__version__)') with compiled ops already installed"
else
  # mmcv 2.1.0 has no wheel on PyPI; its setup.py needs the installed torch (no build isolation) and an
  # older setuptools. pip caches the built wheel, so this is slow (about 14 min on 2 cores) only once.
  log "building $MMCV_SPEC with compiled ops (first time on a machine: ~15 min; later: seconds from pip's cache)"
  python -m pip uninstall -q -y mmcv-lite mmcv 2>/dev/null || true
  python -m pip install -q "setuptools<70" wheel ninja
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install --no-build-isolation "$MMCV_SPEC"
  python -m pip install -q "setuptools>=77.0.3"  # what torch asks for
fi

if [[ "${CRFM_WITH_XFORMERS:-0}" == "1" ]]; then
  log "installing xformers (optional, CUDA only)"
  python -m pip install -q xformers
fi

log "installing crfm (editable)"
python -m pip install -q --no-deps --no-build-isolation -e .

python - <<'PY'
import mmcv.ops  # noqa: F401  (fails without the compiled ops)
import mmseg, torch, diffusers, transformers, peft, accelerate
print(f"[setup] torch {torch.__version__} (cuda: {torch.cuda.is_available()}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, "
      f"mmseg {mmseg.__version__}")
PY
echo "$fingerprint" > "$stamp"
log "done in $((SECONDS - start)) s"
