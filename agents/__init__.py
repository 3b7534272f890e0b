"""agents: the per-rank agent process (shared-memory snapshots, parity, flushing).

May import ``ckpt`` and ``recovery``; nothing imports it. The agent arrives with its own issue;
this package exists now so the import direction ``ckpt <- recovery <- agents`` is enforced from
the first commit (``tests/unit/test_import_direction.py``).
"""

__all__: list[str] = []
