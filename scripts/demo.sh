#!/usr/bin/env bash
# Set up .venv (first run only) and run the demo: train, checkpoint, "crash", resume bit-exactly,
# list, inspect and verify the checkpoint with the ckpt CLI, catch a flipped bit; then kill -9 a
# two-rank tensor-parallel job mid-training and resume it from its agents' memory, bit for bit.
set -euo pipefail
. "$(dirname "$0")/_env.sh"
python examples/quickstart.py "$@"
echo
python examples/crash_demo.py
