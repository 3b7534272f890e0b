"""docs/manifest.schema.json agrees with what the writer produces and the reader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

import ckpt

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "manifest.schema.json").read_text())


def _manifests(root: Path) -> list[Path]:
    return sorted(root.rglob("manifests/*.json"))


@pytest.mark.parametrize("path", _manifests(ROOT / "tests" / "fixtures"), ids=lambda p: p.parent.parent.name)
def test_golden_manifests_match_the_schema(path: Path) -> None:
    jsonschema.validate(json.loads(path.read_bytes()), SCHEMA)


def test_fresh_manifests_match_the_schema(tmp_path) -> None:
    state = {"w": torch.randn(3, 4).to(torch.bfloat16), "n": {"k": (1, float("nan"), b"x")}, "i": {3: torch.arange(4)}}
    ckpt.save(state, str(tmp_path / "a"), step=1, compression="zstd", extras={"x": [1]})
    ckpt.save(state, str(tmp_path / "b"), step=2, compression=None, checksum_algorithm="xxh3_64")
    for path in _manifests(tmp_path):
        jsonschema.validate(json.loads(path.read_bytes()), SCHEMA)


def test_schema_rejects_what_the_reader_rejects() -> None:
    doc = json.loads(_manifests(ROOT / "tests" / "fixtures")[0].read_bytes())
    doc["tensors"][next(iter(doc["tensors"]))]["chunks"][0]["object"] = "../escape"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
