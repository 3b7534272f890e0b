"""Bad arguments to ``CheckpointHook`` fail at construction, naming the argument (no agent is
started: the constructor only checks and assigns)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt.hook import CheckpointHook


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"snapshot_every": 0}, "snapshot_every must be >= 1"),
        ({"persist_every": -1}, "persist_every must be >= 0"),
        ({"store_port": 70000}, "store_port must be a TCP port"),
        ({"store_port": -1}, "store_port must be a TCP port"),
        ({"shm_limit": -1}, "shm_limit must be >= 0 bytes"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CheckpointHook({"w": torch.ones(2)}, storage=str(tmp_path / "s"), run_dir=str(tmp_path / "run"), **kwargs)
    assert not (tmp_path / "run").exists()


def test_store_port_is_kept_as_given(tmp_path: Path) -> None:
    hook = CheckpointHook({"w": torch.ones(2)}, storage=str(tmp_path / "s"), run_dir=str(tmp_path / "run"), store_port=29123)
    assert hook._store_port == 29123
