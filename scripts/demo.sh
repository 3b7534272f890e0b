#!/usr/bin/env bash
# Set up .venv (first run only) and run the demo: train, checkpoint, "crash", resume bit-exactly,
# then list, inspect and verify the checkpoint with the ckpt CLI, and catch a flipped bit.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
python examples/quickstart.py "$@"
