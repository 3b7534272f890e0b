"""Two real ranks (separate processes, gloo on loopback) save and load through ``TorchComm``.

Each test starts ``_gloo_worker.py`` once per rank and reads what each rank saw from a JSON file.
A watchdog bounds every job: if any rank fails, the others are killed at once (they would wait
in a collective); if the job outlives ``DEADLINE_S``, all ranks are killed and the test fails
with their logs. The rendezvous binds port 0 (rank 0 publishes the port it got), so two jobs
never race for a "free" port.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.store.local import LocalStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for any --import-mode
import _gloo_worker as worker  # noqa: E402
import _procs  # noqa: E402

WORKER = Path(worker.__file__).resolve()
WORLD = 2
#: A job (two interpreters importing torch, then a few saves) must finish by this.
DEADLINE_S = 120.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_OBJECT = re.compile(r"^r(\d{5})-\d{4}\.bin$")


def run_job(tmp_path: Path, scenario: str) -> tuple[str, list[dict[str, Any]]]:
    """Run ``scenario`` on ``WORLD`` ranks; returns (checkpoint root, each rank's report)."""
    root, rdv = tmp_path / "ckpt", tmp_path / "rendezvous"
    rdv.mkdir()
    env = _procs.rank_env()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(WORLD):
            procs.append(_procs.start_rank(
                [WORKER, scenario, rank, WORLD, root, rdv, tmp_path / f"rank{rank}.json"],
                tmp_path / f"rank{rank}.log", env,
            ))
        _procs.wait_all(procs, scenario, tmp_path, DEADLINE_S)
    finally:
        _procs.stop(procs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["comm"] for r in reports] == ["TorchComm"] * WORLD
    return str(root), reports


def _writer(obj: str) -> int:
    m = _OBJECT.match(obj)
    assert m is not None, f"unexpected object name {obj!r}"
    return int(m.group(1))


def _data_saves(root: str) -> set[str]:
    """The save prefixes (``data/step-N.ID/``) that have data objects."""
    return {k.rsplit("/", 1)[0] + "/" for k in LocalStore(root).list("data/")}


def test_two_ranks_write_replicas_once_spread_and_load_bit_exact(tmp_path: Path) -> None:
    root, reports = run_job(tmp_path, "roundtrip")
    r0, r1 = reports
    assert r0["save_id"] == r1["save_id"] and r0["loaded_save_id"] == r0["save_id"]

    store, m = ckpt.open_manifest(root)
    assert (m.step, m.world_size, m.extras) == (1, 2, {"job": "gloo"})
    local = {f"rank{r:05d}/{n}": r for r in range(WORLD) for n in worker.RANK_LOCAL}
    assert set(m.tensors) == set(worker.REPLICATED) | set(local)
    writers = {}
    for name, t in m.tensors.items():
        ranks = {_writer(c.object) for c in t.chunks}
        assert len(ranks) == 1, f"{name} written by ranks {ranks}"
        assert sum(c.raw_length for c in t.chunks) == t.nbytes, f"{name} stored more than once"
        writers[name] = ranks.pop()
    for name, rank in local.items():
        assert writers[name] == rank, f"rank-local {name} written by rank {writers[name]}"
    assert {writers[n] for n in worker.REPLICATED} == {0, 1}, f"replica writes not spread: {writers}"
    on_disk = [k[len(m.data_prefix):] for k in store.list(m.data_prefix)]
    assert on_disk == m.objects(), "data objects that the manifest does not reference"
    assert r0["rank_bytes"] > 0 and r1["rank_bytes"] > 0
    assert r0["rank_bytes"] + r1["rank_bytes"] == m.stored_bytes == r0["stored_bytes"]

    for rank, r in enumerate(reports):
        assert r["loaded_step"] == 1 and r["in_place"]
        assert r["loaded"] == r["saved"], f"rank {rank} did not load what it saved"
        assert r["info"] == {"rank": rank, "name": f"worker-{rank}", "lr": 0.01 * (rank + 1), "tags": ["a", rank]}
    for name in worker.REPLICATED:
        assert r0["loaded"][name] == r1["loaded"][name]
    for name in worker.RANK_LOCAL:
        assert r0["loaded"][name] != r1["loaded"][name], f"{name} should differ per rank"

    # One process, no process group: rank 0's view (its rank-local tensors and plain values).
    with torch.random.fork_rng():  # build_state seeds the global generator
        target = worker.build_state(0, seed=3)
    result = ckpt.load(target, root)
    assert worker.digests(target) == r0["saved"]
    assert result.state["info"] == r0["info"]
    assert ckpt.verify(root).ok


def test_failing_put_on_rank_1_fails_both_ranks_and_commits_nothing(tmp_path: Path) -> None:
    root, reports = run_job(tmp_path, "put_fails")
    for rank, r in enumerate(reports):
        failed = r["failed"]
        assert failed["raised"] == "SaveFailedError", f"rank {rank}: {failed}"
        assert list(failed["failures"]) == ["1"] and failed["step"] == 2, f"rank {rank}: {failed}"
        assert "OSError" in failed["failures"]["1"] and "injected" in failed["failures"]["1"]
        assert "rank(s) [1]" in failed["message"] and "rank 1:" in failed["message"]
        assert r["after"]["steps"] == [1], f"rank {rank} saw steps {r['after']['steps']}"
        assert {k.split(".")[0] for k in r["after"]["data"]} == {"data/step-000000000001"}
    assert reports[1]["failing_puts"] > 0, "rank 1 owned no tensor, so its store never failed"
    written = [k for k in reports[0]["written"] if k.startswith("data/")]
    assert written, "rank 0 wrote no data for the failed save; the cleanup went untested"
    failed_prefix = written[0].rsplit("/", 1)[0] + "/"
    assert failed_prefix.startswith("data/step-000000000002.")
    assert not any(k.startswith(failed_prefix) for k in reports[0]["after"]["data"]), "partial data left"
    # Only steps 1 and 3 ever had data; the group survived the failure and saved step 3.
    assert ckpt.list_steps(root) == [1, 3]
    assert {p.split(".")[0] for p in _data_saves(root)} == {"data/step-000000000001", "data/step-000000000003"}
    assert reports[0]["step3"] == reports[1]["step3"]


def test_replicas_that_disagree_fail_both_ranks_and_commit_nothing(tmp_path: Path) -> None:
    root, reports = run_job(tmp_path, "mismatch")
    for rank, r in enumerate(reports):
        for what, step, detail in (("shape", 2, "global shape differs between ranks: [8, 4] on rank 0; [8, 5] on rank 1"),
                                   ("dtype", 3, "dtype differs between ranks: float32 on rank 0; float64 on rank 1")):
            failed = r[what]
            assert failed["raised"] == "SaveFailedError" and failed["step"] == step, f"rank {rank} {what}: {failed}"
            assert failed["failures"], f"rank {rank} {what}: no rank named"
            for message in failed["failures"].values():
                assert "'w'" in message and detail in message, message
        assert r["after"]["steps"] == [1]
        assert {k.split(".")[0] for k in r["after"]["data"]} == {"data/step-000000000001"}
    assert ckpt.list_steps(root) == [1, 4]
    assert {p.split(".")[0] for p in _data_saves(root)} == {"data/step-000000000001", "data/step-000000000004"}
    loaded = ckpt.load({"w": torch.ones(8, 4), "b": torch.zeros(3)}, root)
    assert torch.equal(loaded.state["w"], torch.zeros(8, 4)) and torch.equal(loaded.state["b"], torch.ones(3))
