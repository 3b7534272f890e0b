"""recovery: the control plane (coordinator service, membership, restore planning).

Imports ``ckpt`` (never ``agents``) and never imports torch. The coordinator arrives with its
own issue; this package exists now so the import direction ``ckpt <- recovery <- agents`` is
enforced from the first commit (``tests/unit/test_import_direction.py``).
"""

__all__: list[str] = []
