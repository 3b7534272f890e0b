"""``python -m ckpt`` runs the ``ckpt`` command line."""

import sys

from ckpt.cli import main

sys.exit(main())
