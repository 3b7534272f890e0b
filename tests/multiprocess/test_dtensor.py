"""DTensors saved and loaded by two real gloo ranks, their placements read directly (no rules).

The job runs through ``test_gloo_save_load``'s harness (rendezvous on port 0, watchdog, logs);
this file is also the worker: ``python test_dtensor.py SCENARIO RANK WORLD ROOT RDV OUT`` adds
its scenario to ``_gloo_worker``'s and runs that worker's ``main``.

Saved: ``model.a`` (float32, 5 rows: uneven over 2 ranks) as ``Shard(0)`` and ``model.b``
(bfloat16) as ``Shard(1)`` on a 1-D mesh ``("dp",)``, beside a plain tensor ``w`` split by a rule
and a replicated ``step``, with ``layout=Layout.grid(dp=2)``. Loaded by the same two ranks into
``Replicate`` DTensors and into the swapped placements, and in one process into plain tensors
(with no layout, with ``Layout.single()``, and with ``Layout.single()`` plus rules).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for any --import-mode
import _gloo_worker as worker  # noqa: E402

import ckpt  # noqa: E402
from ckpt.layout import Layout  # noqa: E402
from ckpt.rules import Replicated, Rules, Split  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORLD = 2
#: Rules for the plain tensors only; the DTensors map by their placements.
RULES = Rules(shards=(Split(r"w", dim=0, axis="dp"), Replicated(r"step")), name="dtensor-test")
#: One process, plain tensors everywhere: the former DTensors are whole (replicated) tensors.
SINGLE_RULES = Rules(shards=(Split(r"w", dim=0, axis="dp"), Replicated(r"step|model\..+")), name="dtensor-single")
SAVED = {"model.a": ("shard", 0), "model.b": ("shard", 1)}
SWAPPED = {"model.a": ("shard", 1), "model.b": ("shard", 0)}
REPLICATED = {"model.a": ("replicate",), "model.b": ("replicate",)}


def logical() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "model.a": torch.randn(5, 3, generator=g),
        "model.b": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "w": torch.randn(6, 2, generator=g),
        "step": torch.tensor(17, dtype=torch.int64),
    }


def expected_local(full: torch.Tensor, placement: tuple, n: int, c: int) -> torch.Tensor:
    """DTensor's local shard: ``Shard(d)`` is torch.chunk along d (ceil pieces, trailing short)."""
    if placement[0] == "replicate":
        return full
    d = placement[1]
    k = -(-full.shape[d] // n)
    start = min(c * k, full.shape[d])
    return full.narrow(d, start, min(k, full.shape[d] - start))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


# --------------------------------------------------------------------------------------------
# The worker side (runs in the rank processes)
# --------------------------------------------------------------------------------------------
def _dtensors(mesh: Any, glob: dict[str, torch.Tensor], placements: dict[str, tuple], zero: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for name, p in placements.items():
        full = torch.zeros_like(glob[name]) if zero else glob[name]
        placement = Shard(p[1]) if p[0] == "shard" else Replicate()
        out[name.split(".", 1)[1]] = distribute_tensor(full, mesh, [placement], src_data_rank=None)
    return out


def _load_into(mesh: Any, glob: dict[str, torch.Tensor], root: str, rank: int, placements: dict[str, tuple]) -> dict[str, Any]:
    """Load step 1 into zeroed DTensors of ``placements``; report what each rank's shard holds."""
    lay = Layout.grid(dp=WORLD, rank=rank)
    model = _dtensors(mesh, glob, placements, zero=True)
    target = {"model": model, "w": torch.zeros(3, 2), "step": torch.zeros((), dtype=torch.int64)}
    ptrs = {k: v.to_local().data_ptr() for k, v in model.items()}
    ckpt.load(target, root, step=1, layout=lay, rules=RULES)
    out: dict[str, Any] = {"in_place": ptrs == {k: v.to_local().data_ptr() for k, v in model.items()}}
    for name, p in placements.items():
        local = model[name.split(".", 1)[1]].to_local()
        out[name] = _bits_equal(local, expected_local(glob[name], p, WORLD, rank))
    out["w"] = _bits_equal(target["w"], expected_local(glob["w"], ("shard", 0), WORLD, rank))
    out["step"] = _bits_equal(target["step"], glob["step"])
    return out


def _failure(fn: Any) -> dict[str, str]:
    try:
        fn()
    except Exception as e:
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": ""}


def dtensor_scenario(rank: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    glob = logical()
    lay = Layout.grid(dp=WORLD, rank=rank)
    state = {
        "model": _dtensors(mesh, glob, SAVED, zero=False),
        "w": expected_local(glob["w"], ("shard", 0), WORLD, rank).clone(),
        "step": glob["step"].clone(),
        "info": {"rank": rank},
    }
    saved = ckpt.save(state, root, step=1, layout=lay, rules=RULES)
    report: dict[str, Any] = {
        "save_id": saved.save_id,
        "replicate": _load_into(mesh, glob, root, rank, REPLICATED),
        "swapped": _load_into(mesh, glob, root, rank, SWAPPED),
        "same": _load_into(mesh, glob, root, rank, SAVED),
    }
    # No layout and no rules: the default layout (dp = world size) is the DTensors' mesh.
    ckpt.save({"model": _dtensors(mesh, glob, SAVED, zero=False)}, root, step=2)
    partial = {"p": DTensor.from_local(torch.ones(2), mesh, [Partial()])}
    report["partial"] = _failure(lambda: ckpt.save(partial, root, step=3))
    report["wrong_mesh"] = _failure(lambda: ckpt.save({"model": state["model"]}, root, step=4, layout=Layout.grid(tp=WORLD, rank=rank)))
    report["no_layout_load"] = _failure(lambda: ckpt.load({"model": _dtensors(mesh, glob, SAVED, zero=True)}, root, step=2))
    report["steps"] = ckpt.list_steps(root)
    return report


# --------------------------------------------------------------------------------------------
# The test side
# --------------------------------------------------------------------------------------------
def _tensor_refs(node: Any) -> list[tuple[str, str]]:
    """Every ``(tag, name)`` tensor reference in a saved tree."""
    if isinstance(node, list):
        return [r for x in node for r in _tensor_refs(x)]
    if isinstance(node, dict):
        ((tag, val),) = node.items()
        if tag in ("$tensor", "$shard", "$ndarray"):
            return [(tag, val)]
        if tag == "$dict":
            return [r for _, v in val for r in _tensor_refs(v)]
        if tag == "$tuple":
            return _tensor_refs(val)
    return []


def test_dtensors_reshard_between_placements_and_load_whole_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import test_gloo_save_load as harness

    monkeypatch.setattr(harness, "WORKER", Path(__file__).resolve())
    root, reports = harness.run_job(tmp_path, "dtensor")
    glob = logical()

    for rank, r in enumerate(reports):
        for case in ("replicate", "swapped", "same"):
            assert r[case] == {"in_place": True, "model.a": True, "model.b": True, "w": True, "step": True}, (rank, case, r[case])
        assert r["partial"]["raised"] == "UnsupportedStateError", r["partial"]
        assert "partial values" in r["partial"]["message"] and "redistribute" in r["partial"]["message"]
        assert r["wrong_mesh"]["raised"] == "RulesError", r["wrong_mesh"]
        assert "mesh dim(s) dp=2" in r["wrong_mesh"]["message"] and "tp=2" in r["wrong_mesh"]["message"]
        assert r["no_layout_load"]["raised"] == "StateMismatchError", r["no_layout_load"]
        assert "load with layout=" in r["no_layout_load"]["message"]
        assert r["steps"] == [1, 2]
    assert reports[0]["save_id"] == reports[1]["save_id"]

    # The manifest: global tensors, both ranks' shards written by their holders, $tensor nodes.
    _, m = ckpt.open_manifest(root, step=1)
    assert m.layout == {"axes": [["dp", 2]], "rules": RULES.to_json()}
    for name in ("model.a", "model.b", "w"):
        meta = m.tensors[name]
        assert tuple(meta.shape) == tuple(glob[name].shape) and sum(c.raw_length for c in meta.chunks) == meta.nbytes
        assert {int(c.object[1:6]) for c in meta.chunks} == {0, 1}, f"{name}: each rank writes its own shard"
    for tree in m.ranks:
        refs = dict((n, t) for t, n in _tensor_refs(tree))
        assert refs["model.a"] == refs["model.b"] == "$tensor"  # DTensor local name == global name
        assert refs["w"] == "$shard"  # split by a rule: only a rule-aware load may place it
    assert ckpt.verify(root, step=1).ok and ckpt.verify(root, step=2).ok
    _, m2 = ckpt.open_manifest(root, step=2)
    assert m2.layout is None and set(m2.tensors) == {"model.a", "model.b"}

    def plain(names: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"model": {}}
        for n in names:
            t = torch.zeros_like(glob[n])
            if n.startswith("model."):
                out["model"][n[len("model."):]] = t
            else:
                out[n] = t
        return out

    def check(state: dict[str, Any], names: tuple[str, ...]) -> None:
        for n in names:
            got = state["model"][n[len("model."):]] if n.startswith("model.") else state[n]
            assert _bits_equal(got, glob[n]), n

    # One process, plain full tensors: no layout at all (the tree's $tensor references) ...
    target = plain(("model.a", "model.b"))
    ckpt.load(target, root, step=2)
    check(target, ("model.a", "model.b"))
    # ... Layout.single() without rules (identity by name), also beside a rule-split tensor ...
    target = plain(("model.a", "model.b"))
    ckpt.load(target, root, step=1, layout=Layout.single())
    check(target, ("model.a", "model.b"))
    # ... and Layout.single() with rules for every (now plain) tensor.
    names = ("model.a", "model.b", "w", "step")
    target = plain(names)
    ckpt.load(target, root, step=1, layout=Layout.single(), rules=SINGLE_RULES)
    check(target, names)


if __name__ == "__main__":
    worker.SCENARIOS["dtensor"] = dtensor_scenario
    worker.main(sys.argv[1:])
