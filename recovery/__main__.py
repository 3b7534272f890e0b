"""``python -m recovery``: the coordinator (``recovery.cli``)."""

from recovery.cli import main

raise SystemExit(main())
