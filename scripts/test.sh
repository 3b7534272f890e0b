#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite. CI runs exactly this.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
exec python -m pytest -q "$@"
