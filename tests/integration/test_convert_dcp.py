"""DCP checkpoints written by ``torch.distributed.checkpoint.save`` itself, converted, and loaded
back by ``torch.distributed.checkpoint.load``: one process, and a 2-rank sharded DTensor save.

This file is also the rank worker of the 2-rank job: ``python test_convert_dcp.py RANK WORLD
OUT RDV`` (gloo on loopback; rank 0 binds port 0 and publishes it in ``RDV/port``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2
TIMEOUT = timedelta(seconds=90)


def logical() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {
        "model.a": torch.randn(7, 3, generator=g),  # Shard(0): 4 + 3 rows
        "model.b": torch.randn(4, 6, generator=g).to(torch.bfloat16),  # Shard(1)
        "model.rep": torch.arange(12, dtype=torch.int32).reshape(3, 4),  # a plain replicated tensor
    }


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------
def _rendezvous(rank: int, rdv: str) -> Any:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiprocess"))
    from _rendezvous import rendezvous

    return rendezvous(rank, WORLD, rdv, TIMEOUT)


def worker(rank: int, out: str, rdv: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=_rendezvous(rank, rdv), rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
        full = logical()
        state = {
            "model": {
                "a": distribute_tensor(full["model.a"], mesh, [Shard(0)]),
                "b": distribute_tensor(full["model.b"], mesh, [Shard(1)]),
                "rep": full["model.rep"],
            },
            "step": 11,
        }
        _dcp().save(state, checkpoint_id=out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def _sharded_save(tmp_path: Path) -> Path:
    out, rdv = tmp_path / "dcp2", tmp_path / "rdv"
    rdv.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = []
    for rank in range(WORLD):
        log = open(tmp_path / f"rank{rank}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, __file__, str(rank), str(WORLD), str(out), str(rdv)],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    for p in procs:
        p.wait()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text(errors="replace")[-3000:] for r in range(WORLD))
    assert all(p.returncode == 0 for p in procs), logs
    return out


def _dcp_load(path: Path) -> dict[str, Any]:
    full = logical()
    target = {"model": {"a": torch.zeros_like(full["model.a"]), "b": torch.zeros_like(full["model.b"]),
                        "rep": torch.zeros_like(full["model.rep"])}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _dcp().load(target, checkpoint_id=str(path))
    return target


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_sharded_dtensor_save_converts_and_dcp_loads_it_back(tmp_path: Path) -> None:
    from ckpt.convert import convert
    from ckpt.formats import open_reader

    src = _sharded_save(tmp_path)
    full = logical()
    with open_reader(str(src)) as r:
        assert r.format == "dcp" and len(r.meta.tensors["model.a"].chunks) == 2 and len(r.meta.tensors["model.b"].chunks) == 2
        assert r.plain_state() == {"step": 11}
        for name, want in full.items():
            assert torch.equal(r.read(name), want), name
    convert(str(src), str(tmp_path / "u"), dst_format="universal")
    convert(str(tmp_path / "u"), str(tmp_path / "m.safetensors"))
    convert(str(tmp_path / "m.safetensors"), str(tmp_path / "back"), dst_format="dcp")
    loaded = _dcp_load(tmp_path / "back")
    assert loaded["step"] == 11
    assert torch.equal(loaded["model"]["a"], full["model.a"]) and torch.equal(loaded["model"]["b"], full["model.b"])
    assert torch.equal(loaded["model"]["rep"], full["model.rep"])


def test_single_process_dcp_save_converts_and_loads_back(tmp_path: Path) -> None:
    from ckpt.convert import convert, diff

    full = logical()
    state = {"model": {"a": full["model.a"], "b": full["model.b"], "rep": full["model.rep"]}, "step": 11}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _dcp().save(state, checkpoint_id=str(tmp_path / "src"))
    convert(str(tmp_path / "src"), str(tmp_path / "h"), dst_format="hf")
    convert(str(tmp_path / "h"), str(tmp_path / "t.pt"))
    convert(str(tmp_path / "t.pt"), str(tmp_path / "back"), dst_format="dcp")
    loaded = _dcp_load(tmp_path / "back")
    assert loaded["step"] == 11 and all(torch.equal(loaded["model"][k.split(".")[1]], v) for k, v in full.items())
    assert diff(str(tmp_path / "src"), str(tmp_path / "back")).equal
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "back"), str(tmp_path / "dcp_own.pt"))  # DCP's own converter reads it too
    assert diff(str(tmp_path / "dcp_own.pt"), str(tmp_path / "t.pt")).equal


def test_transposed_and_sliced_tensors_are_stored_compactly(tmp_path: Path) -> None:
    from ckpt.convert import convert
    from ckpt.formats import open_reader

    base = torch.randn(64, 64)
    state = {"t": base.t(), "row": base[3], "narrow": base[:, 5:9]}
    torch.save(state, tmp_path / "v.pt")
    for fmt, name in (("dcp", "d"), ("torch", "o.pt"), ("universal", "u"), ("safetensors", "s.safetensors")):
        convert(str(tmp_path / "v.pt"), str(tmp_path / name), dst_format=fmt)
        with open_reader(str(tmp_path / name)) as r:
            for k, v in state.items():
                assert torch.equal(r.read(k), v), (fmt, k)
    size = sum(p.stat().st_size for p in (tmp_path / "d").iterdir())
    assert size < 64 * 64 * 4 * 1.5 + 20000, "views were saved with their whole storage"


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[3], sys.argv[4])
