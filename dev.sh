#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv on first use, then runs what you ask.
#   bash dev.sh train [flags]   the default training job (tiny embedded GPT-2 + bundled task)
#   bash dev.sh test [pytest args]   the test suite (all tiers; tests/unit is the fast tier)
#   bash dev.sh setup           only the set-up
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  local stamp="$VENV/.ptuning_dist-setup"
  if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then return; fi
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
  # On a GPU cluster, install your CUDA build of torch before running this.
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "$PY" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import ptuning_dist, torch, deepspeed, transformers, megatron.core" >/dev/null
  touch "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  train) setup; OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} exec "$PY" launchers/train.py "$@" ;;
  test)
    setup
    set +e
    "$PY" -m pytest "$@"
    rc=$?
    set -e
    # pytest exits 5 when it collected no test: that is a failure, not a pass.
    if [[ $rc -eq 5 ]]; then echo "error: no tests were collected" >&2; exit 1; fi
    exit $rc ;;
  *) echo "usage: bash dev.sh {setup|train|test} [args]" >&2; exit 2 ;;
esac
