# Sourced by scripts/demo.sh and scripts/test.sh: create .venv and install the project into it.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# Users bring their own torch; we default to the CPU build that CI uses.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC"
  python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
stamp="$VENV/.ckpt-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing ckpt-recovery and its test dependencies"
  python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
