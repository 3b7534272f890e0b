"""The hook under ``torch.distributed`` with real processes: 2 gloo ranks, each with its agent.

Every job is killed with SIGKILL at a random time (all trainers at once), restarted as new
processes on the same run directories, and must restore from the agents' memory (the same step
on every rank) and continue with losses bit-identical to an uninterrupted run. The agents persist
every ``EVERY``-th step together, as one checkpoint of the job (``StoreComm`` over rank 0's
agent's ``TCPStore``): for TP it loads into a single process (TP=1) with every logical tensor
equal to the ranks' shards concatenated, and a job whose agents are gone resumes from it
bit-exactly. After each test no agent process and no shared-memory segment of the run is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for any --import-mode
import _hook_worker as worker  # noqa: E402
import _procs  # noqa: E402

WORKER = Path(worker.__file__).resolve()
WORLD = 2
STEPS = 12
EVERY = 4
DEADLINE_S = 120.0
STEP_SLEEP_S = 0.02

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


# ------------------------------------------------------------------------------------ helpers
class Job:
    """The ranks of one run of ``_hook_worker.py`` (``tag`` names its files under ``base``)."""

    def __init__(self, base: Path, tag: str, mode: str, run_root: Path, storage: Path, *extra: Any) -> None:
        self.base, self.tag = base, tag
        self.logs = base / tag
        self.logs.mkdir()
        (self.logs / "rdv").mkdir()
        self.outs = [self.logs / f"out{r}.jsonl" for r in range(WORLD)]
        self.procs = [
            _procs.start_rank(
                [WORKER, mode, r, WORLD, self.logs / "rdv", run_root, storage, self.outs[r], "--steps", STEPS, *extra],
                self.logs / f"rank{r}.log", _procs.rank_env(),
            )
            for r in range(WORLD)
        ]

    def wait(self) -> None:
        try:
            _procs.wait_all(self.procs, self.tag, self.logs, DEADLINE_S)
        finally:
            _procs.stop(self.procs)

    def kill_at_random(self, rng: random.Random) -> None:
        """SIGKILL every rank at a random time once each has finished a random step (before,
        during or after a snapshot copy: within ``STEP_SLEEP_S`` of that step's end); the
        restart then starts before step ``EVERY * 2``, which its agents persist together."""
        after = rng.randrange(2, EVERY + 1)
        deadline = time.monotonic() + DEADLINE_S
        while not all(after in losses(o) for o in self.outs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                _procs.stop(self.procs)
                pytest.fail(f"{self.tag}: no rank reached step {after} alive\n{_procs.logs(self.logs, WORLD)}")
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, STEP_SLEEP_S * 0.75))
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
        codes = [p.wait(DEADLINE_S) for p in self.procs]
        assert codes == [-signal.SIGKILL] * WORLD, f"{self.tag}: ranks ended before the kill: {codes}"

    def records(self, rank: int) -> list[dict[str, Any]]:
        return records(self.outs[rank])


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def losses(path: Path) -> dict[int, str]:
    return {r["step"]: r["loss"] for r in records(path) if "loss" in r}


def agent_pids(run_root: Path) -> list[int]:
    from ckpt.snapshot._shm import read_pid

    return [p for r in range(WORLD) if (p := read_pid(run_root / f"rank{r}" / f"agent-r{r}.pid")) is not None]


def shm_segments(run_root: Path) -> list[str]:
    from ckpt.snapshot._shm import segment_prefix

    prefixes = tuple(segment_prefix(run_root / f"rank{r}", r) for r in range(WORLD))
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefixes))


def stop_agents(run_root: Path, pids: set[int]) -> None:
    """SIGTERM the agents this test started (by pid), SIGKILL them after 30 s."""
    pids |= set(agent_pids(run_root))
    _procs.terminate_pids(pids)


def assert_clean(run_root: Path, pids: set[int]) -> None:
    from ckpt.snapshot._shm import pid_alive

    deadline = time.monotonic() + 30
    while (shm_segments(run_root) or any(pid_alive(p) for p in pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if pid_alive(p)] == [], "leaked agent processes"
    assert shm_segments(run_root) == [], "leaked shared-memory segments"


def wait_persisted(storage: Path, step: int, logs: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while step not in (ckpt.list_steps(str(storage)) if storage.exists() else []):
        assert time.monotonic() < deadline, f"the agents never committed step {step}\n{logs}"
        time.sleep(0.1)


def agent_logs(run_root: Path) -> str:
    return "\n".join(f"--- agent {r} ---\n" + (run_root / f"rank{r}" / f"agent-r{r}.log").read_text()[-4000:] for r in range(WORLD) if (run_root / f"rank{r}" / f"agent-r{r}.log").exists())


def kill_and_restore_from_memory(tmp_path: Path, mode: str, seed: int, *extra: Any) -> tuple[Path, Path, list[dict[int, str]], Job]:
    """Reference run, a run killed at a random time, a restart from the agents' memory (losses
    checked); returns (run root, storage, reference losses, the restart job)."""
    run_root, storage = tmp_path / "run", tmp_path / "store"
    ref = Job(tmp_path, "reference", mode, tmp_path / "no-run", tmp_path / "no-store", "--no-hook")
    ref.wait()
    reference = [losses(o) for o in ref.outs]
    assert all(sorted(r) == list(range(STEPS)) for r in reference)

    first = Job(tmp_path, "killed", mode, run_root, storage, "--persist-every", EVERY, "--step-sleep", STEP_SLEEP_S)
    first.kill_at_random(random.Random(seed))
    assert len(agent_pids(run_root)) == WORLD, "every agent outlives its trainer"

    second = Job(tmp_path, "restarted", mode, run_root, storage, "--persist-every", EVERY, *extra)
    second.wait()
    heads = [second.records(r)[0] for r in range(WORLD)]
    assert [h["from"] for h in heads] == ["memory"] * WORLD, heads
    assert len({h["restored"] for h in heads}) == 1, f"ranks restored different steps: {heads}"
    start = heads[0]["restored"]
    assert start <= 2 * EVERY, f"restarted at step {start}: the test needs a persist step after it"
    for r in range(WORLD):
        before, after = losses(first.outs[r]), losses(second.outs[r])
        assert start - 1 in before, f"rank {r} restored step {start - 1}, which it never finished"
        assert sorted(after) == list(range(start, STEPS))
        for step, loss in {**before, **after}.items():
            assert loss == reference[r][step], f"rank {r}: loss of step {step} differs from the uninterrupted run"
        assert second.records(r)[-1] == {"done": True}
    return run_root, storage, reference, second


def persisted_after_restore(tmp_path: Path, mode: str, seed: int, dump: str, pids: set[int]) -> tuple[Path, list[dict[int, str]]]:
    """``kill_and_restore_from_memory`` with each rank dumping its tensors after the last
    persist step (to ``tmp_path / dump``, ``{rank}`` in it), then: that step committed by the
    agents, the agents stopped, nothing left. Returns (storage, reference losses)."""
    last = (STEPS - 1) // EVERY * EVERY
    run_root, storage, reference, _ = kill_and_restore_from_memory(tmp_path, mode, seed, "--dump-at", last, "--dump", tmp_path / dump)
    pids |= set(agent_pids(run_root))
    wait_persisted(storage, last, agent_logs(run_root))
    stop_agents(run_root, pids)
    assert_clean(run_root, pids)
    return storage, reference


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("seed", [0])
def test_dp_sigkill_restores_from_agent_memory_bit_exact(tmp_path: Path, seed: int) -> None:
    run_root = tmp_path / "run"
    pids: set[int] = set()
    try:
        run_root, storage, _, job = kill_and_restore_from_memory(tmp_path, "dp", seed)
        pids |= set(agent_pids(run_root))
        last = (STEPS - 1) // EVERY * EVERY
        wait_persisted(storage, last, agent_logs(run_root))
        _, manifest = ckpt.open_manifest(str(storage), step=last)
        assert manifest.world_size == WORLD
        assert ckpt.verify(str(storage), step=last).ok
        # replicas are written once: every model/optimizer tensor has one copy of its bytes
        for name, meta in manifest.tensors.items():
            if name.startswith("state."):
                assert sum(c.byte_length for c in meta.chunks) <= meta.nbytes + 64 * len(meta.chunks), name
    finally:
        stop_agents(run_root, pids)
    assert_clean(run_root, pids)


def test_tp_restores_from_memory_then_from_the_agents_checkpoint_in_any_layout(tmp_path: Path) -> None:
    from ckpt.layout import Layout

    run_root = tmp_path / "run"
    pids: set[int] = set()
    last = (STEPS - 1) // EVERY * EVERY
    dumps = [tmp_path / f"shards{r}.pt" for r in range(WORLD)]  # each rank's tensors after step `last`
    try:
        storage, reference = persisted_after_restore(tmp_path, "tp", 1, "shards{rank}.pt", pids)

        # the agents' checkpoint loads into one process (TP=1): logical = concatenated shards
        full = worker.TPMLP(1, 0)
        opt = torch.optim.AdamW(full.parameters(), lr=1e-2)
        full(torch.zeros(1, worker.IN)).sum().backward()
        opt.step()  # creates the optimizer state the load fills
        target = {"state": {"model": full, "optim": opt}}
        result = ckpt.load(target, str(storage), step=last, layout=Layout.grid(tp=1), rules=worker.tp_rules(full), strict=False)
        assert result.step == last
        shards = [torch.load(d, weights_only=True) for d in dumps]
        dims = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}
        got = {f"model.{k}": v for k, v in full.state_dict().items()}
        for i, st in opt.state_dict()["state"].items():
            got.update({f"optim.{i}.{k}": v for k, v in st.items()})
        names = dict(enumerate(n for n, _ in full.named_parameters()))
        for key, value in got.items():
            param = key[len("model."):] if key.startswith("model.") else names[int(key.split(".")[1])]
            if key.endswith(".step") or param not in dims:
                expected = shards[0][key]
                assert all(torch.equal(s[key], expected) for s in shards), f"{key} differs between the TP ranks"
            else:
                expected = torch.cat([s[key] for s in shards], dim=dims[param])
            assert torch.equal(value, expected), f"{key}: loaded logical tensor != concatenated TP shards"

        # the agents are gone and their memory with them: the job resumes from storage
        third = Job(tmp_path, "from-storage", "tp", run_root, storage)
        third.wait()
        pids |= set(agent_pids(run_root))
        for r in range(WORLD):
            head = third.records(r)[0]
            assert (head["from"], head["step"]) == ("storage", last), head
            after = losses(third.outs[r])
            assert sorted(after) == list(range(last + 1, STEPS))
            assert all(after[s] == reference[r][s] for s in after), f"rank {r}: losses after the storage restore differ"
    finally:
        stop_agents(run_root, pids)
    assert_clean(run_root, pids)


def test_dtensor_state_restores_from_memory_and_is_persisted_through_its_placements(tmp_path: Path) -> None:
    """DTensor parameters (and their AdamW moments), FSDP2-style: after a SIGKILL the ranks
    restore their local shards from the agents' memory bit for bit; the shards reach the agents
    as plain tensors and the hook hands their placements over, so the agents' checkpoint holds
    the logical tensors."""
    from ckpt.layout import Layout
    from ckpt.rules import Replicated, Rules

    run_root, storage = tmp_path / "run", tmp_path / "store"
    last = (STEPS - 1) // EVERY * EVERY
    pids: set[int] = set()
    try:
        storage, _ = persisted_after_restore(tmp_path, "dtensor", 0, "full{rank}.pt", pids)

        _, manifest = ckpt.open_manifest(str(storage), step=last)
        assert manifest.world_size == WORLD
        assert list(manifest.tensors["state.model.w1"].shape) == [worker.HIDDEN, worker.IN]  # logical, not a shard
        # one process loads the logical tensors as plain ones
        target: dict[str, Any] = {"state": {"model": {}, "optim": {}}}
        rules = Rules(shards=(Replicated(r"state\..+"),), name="dtensor-single")
        names = ["w1", "b1", "w2", "b2"]
        moments = ("exp_avg", "exp_avg_sq")
        for i, name in enumerate(names):
            shape = manifest.tensors[f"state.model.{name}"].shape
            target["state"]["model"][name] = torch.empty(shape)
            target["state"]["optim"].setdefault("state", {})[i] = {m: torch.empty(shape) for m in moments}
        result = ckpt.load(target, str(storage), step=last, layout=Layout.single(), rules=rules, strict=False)
        assert result.step == last
        full = torch.load(tmp_path / "full0.pt", weights_only=True)
        for i, name in enumerate(names):
            assert torch.equal(target["state"]["model"][name], full[f"model.{name}"]), name
            for m in moments:
                assert torch.equal(target["state"]["optim"]["state"][i][m], full[f"optim.{i}.{m}"]), f"{name} {m}"
    finally:
        stop_agents(run_root, pids)
    assert_clean(run_root, pids)


def test_fsdp2_fully_shard_restores_from_memory_and_its_checkpoint_loads_unsharded(tmp_path: Path) -> None:
    """A model under ``torch.distributed.fsdp.fully_shard`` (FSDP2, gloo, CPU mesh), with the
    hook given the module and optimizer as they are: after a SIGKILL the ranks restore their
    shards from the agents' memory and go on bit for bit; the agents' checkpoint loads into the
    same model unsharded in one process, equal to the gathered parameters and AdamW moments."""
    from torch import nn

    from ckpt.layout import Layout

    last = (STEPS - 1) // EVERY * EVERY
    run_root = tmp_path / "run"
    pids: set[int] = set()
    try:
        storage, _ = persisted_after_restore(tmp_path, "fsdp", 2, "full{rank}.pt", pids)

        _, manifest = ckpt.open_manifest(str(storage), step=last)
        assert list(manifest.tensors["state.model.0.weight"].shape) == [worker.HIDDEN, worker.IN]  # logical
        net = nn.Sequential(nn.Linear(worker.IN, worker.HIDDEN), nn.GELU(), nn.Linear(worker.HIDDEN, worker.OUT_DIM))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        net(torch.zeros(1, worker.IN)).sum().backward()
        opt.step()  # creates the optimizer state the load fills
        result = ckpt.load({"state": {"model": net, "optim": opt}}, str(storage), step=last, layout=Layout.single(), strict=False)
        assert result.step == last
        full = torch.load(tmp_path / "full0.pt", weights_only=True)
        for k, v in net.state_dict().items():
            assert torch.equal(v, full[f"model.{k}"]), k
        for i, st in opt.state_dict()["state"].items():
            for m in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(st[m], full[f"optim.{i}.{m}"]), f"param {i} {m}"
    finally:
        stop_agents(run_root, pids)
    assert_clean(run_root, pids)


def test_agent_of_rank_0_killed_mid_run_is_restarted_and_the_agents_persist_together_again(tmp_path: Path) -> None:
    """SIGKILL rank 0's agent (the host of the agents' store) while the job trains: rank 0's
    hook starts a new agent, which hosts the store again where the other agents look for it;
    training goes on and a later step is committed as one verified checkpoint of the job."""
    from ckpt.snapshot._shm import pid_alive, read_pid

    run_root, storage = tmp_path / "run", tmp_path / "store"
    pids: set[int] = set()
    try:
        job = Job(tmp_path, "agent-killed", "dp", run_root, storage, "--persist-every", EVERY, "--step-sleep", 0.05)
        deadline = time.monotonic() + DEADLINE_S
        while 1 not in losses(job.outs[0]):  # before the first persist step (EVERY)
            if time.monotonic() > deadline or any(p.poll() is not None for p in job.procs):
                _procs.stop(job.procs)
                pytest.fail(f"rank 0 never finished step 1\n{_procs.logs(job.logs, WORLD)}")
            time.sleep(0.002)
        victim = read_pid(run_root / "rank0" / "agent-r0.pid")
        assert victim is not None and pid_alive(victim)
        pids.add(victim)
        os.kill(victim, signal.SIGKILL)
        job.wait()
        pids |= set(agent_pids(run_root))
        replacement = read_pid(run_root / "rank0" / "agent-r0.pid")
        assert replacement is not None and replacement != victim, "rank 0's agent was not replaced"

        stats = [next(r["stats"] for r in job.records(rank) if "stats" in r) for rank in range(WORLD)]
        assert [s["agent_restarts"] for s in stats] == [1, 0], stats
        assert all(sorted(losses(o)) == list(range(STEPS)) for o in job.outs), "training stopped with the agent"
        assert all(job.records(r)[-1] == {"done": True} for r in range(WORLD))

        last = (STEPS - 1) // EVERY * EVERY
        wait_persisted(storage, last, agent_logs(run_root))
        _, manifest = ckpt.open_manifest(str(storage), step=last)
        assert manifest.world_size == WORLD
        assert ckpt.verify(str(storage), step=last).ok
    finally:
        stop_agents(run_root, pids)
    assert_clean(run_root, pids)
