"""Shared-memory slots and the agent process: ownership (attachers never unlink), the slot table,
restore from a ``SharedSnapshot``, an agent started by hand (channel, SIGTERM, grace period), and
the hook restarting a dead agent. Every test checks that no segment and no agent is left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt.snapshot._shm import pid_alive
from ckpt.snapshot import SnapshotEngine, restore_from_snapshot
from ckpt.snapshot._shm import (
    SharedMemoryBuffers,
    SharedSnapshot,
    attach_segment,
    create_segment,
    job_id,
    read_table,
    snapshot_entry,
    write_table,
)

DEADLINE = 60.0


def _shm(run_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"ckpt-{job_id(run_dir)}-"))


def _wait(cond: Any, timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _stop(pid: int) -> None:
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not pid_alive(pid), 20):
            os.kill(pid, signal.SIGKILL)
            _wait(lambda: not pid_alive(pid), 10)


def test_attached_segment_survives_the_attacher_exiting(tmp_path: Path) -> None:
    name = f"ckpt-{job_id(tmp_path)}-r0-s0-g1"
    seg = create_segment(name, 10_000)
    try:
        seg.buf[:4] = b"abcd"
        code = (
            "import sys; from ckpt.snapshot._shm import attach_segment; "
            f"s = attach_segment({name!r}); assert bytes(s.buf[:4]) == b'abcd'; s.close()"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=DEADLINE, stderr=subprocess.PIPE)
        time.sleep(0.2)  # a resource tracker would have unlinked it by now
        assert os.path.exists(f"/dev/shm/{name}")
        again = attach_segment(name)
        assert bytes(again.buf[:4]) == b"abcd"
        again.close()
    finally:
        seg.close()
        seg.unlink()
    assert _shm(tmp_path) == []


def _model() -> dict[str, Any]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    o = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(4, 8)).sum().backward()
    o.step()
    return {"model": m, "optim": o, "step": 3, "data": {"pos": 12}}


def test_engine_snapshot_in_shared_memory_restores_through_the_slot_table(tmp_path: Path) -> None:
    owned: dict[int, Any] = {}

    def alloc(slot: int, nbytes: int) -> str:  # the owner's side, in this test process
        if slot in owned:
            owned.pop(slot).unlink()
        owned[slot] = create_segment(f"ckpt-{job_id(tmp_path)}-r0-s{slot}-g{len(owned)}", nbytes)
        return owned[slot].name

    state = _model()
    try:
        bufs = SharedMemoryBuffers(alloc, {0: 1, 1: 2})
        with SnapshotEngine(state, buffers=bufs) as engine:
            engine.snapshot(3)
            engine.wait()
            with engine.latest_complete() as snap:
                entry = snapshot_entry(snap, bufs)
            write_table(tmp_path, entry)
        assert entry["slot"] in (1, 2) and entry["segment"] == owned[entry["slot"]].name
        got = read_table(tmp_path)
        assert got == json.loads(json.dumps(entry))
        fresh = _model()
        with torch.no_grad():
            for p in fresh["model"].parameters():
                p.zero_()
        fresh["step"], fresh["data"] = 0, {"pos": 0}
        with SharedSnapshot(got) as shared:
            assert shared.verify() == []
            restore_from_snapshot(fresh, shared)
        for a, b in zip(state["model"].parameters(), fresh["model"].parameters()):
            assert torch.equal(a, b)
        assert fresh["optim"].state_dict()["state"][0]["exp_avg"].equal(state["optim"].state_dict()["state"][0]["exp_avg"])
        # a corrupted byte is caught
        owned[entry["slot"]].buf[entry["tensors"][0]["offset"]] ^= 0xFF
        with SharedSnapshot(got) as shared:
            assert shared.verify() == [entry["tensors"][0]["name"]]
    finally:
        for seg in owned.values():
            seg.close()
            seg.unlink()
    assert _shm(tmp_path) == []
    assert read_table(tmp_path / "nowhere") is None
    (tmp_path / "slots.json").write_text("{not json")
    assert read_table(tmp_path) is None


def _request(sock: Path, req: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(json.dumps(req).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


def _start_agent(run_dir: Path, grace_s: float) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-m", "agents", "--run-dir", str(run_dir), "--rank", "0", "--grace-s", str(grace_s)],
        stdout=subprocess.DEVNULL,
        stderr=open(run_dir / "agent.log", "ab"),
        start_new_session=True,
    )
    assert _wait(lambda: (run_dir / "agent-r0.pid").exists() or p.poll() is not None), "agent did not start"
    assert p.poll() is None, (run_dir / "agent.log").read_text()
    return p


def test_agent_by_hand_serves_slots_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "trainer-r0.pid").write_text(str(os.getpid()))  # this test is the trainer
    p = _start_agent(tmp_path, grace_s=60)
    try:
        sock = tmp_path / "agent-r0.sock"
        assert _request(sock, {"op": "ping"})["pid"] == p.pid
        name = _request(sock, {"op": "alloc", "slot": 0, "nbytes": 100_000})["name"]
        assert _request(sock, {"op": "alloc", "slot": 0, "nbytes": 50})["name"] == name  # reused
        bigger = _request(sock, {"op": "alloc", "slot": 0, "nbytes": 1 << 20})["name"]
        assert bigger != name and _shm(tmp_path) == [bigger]  # the old one unlinked by its owner
        assert _request(sock, {"op": "alloc", "slot": -1, "nbytes": 1})["ok"] is False
        assert _request(sock, {"op": "nope"})["ok"] is False
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(DEADLINE) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _shm(tmp_path) == []
    assert not (tmp_path / "agent-r0.sock").exists() and not (tmp_path / "agent-r0.pid").exists()


def test_agent_exits_after_grace_when_trainer_is_gone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "trainer-r0.pid").write_text(str(dead.pid))
    t0 = time.monotonic()  # before the agent starts: it cannot exit before t0 + grace
    p = _start_agent(tmp_path, grace_s=1.0)
    try:
        _request(tmp_path / "agent-r0.sock", {"op": "alloc", "slot": 1, "nbytes": 4096})
        assert len(_shm(tmp_path)) == 1
        assert p.wait(DEADLINE) == 0
        assert time.monotonic() - t0 >= 1.0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _shm(tmp_path) == []


def test_hook_restarts_a_dead_agent(tmp_path: Path) -> None:
    from ckpt.hook import CheckpointHook

    state = _model()
    hook = CheckpointHook(state=state, storage=str(tmp_path / "store"), run_dir=str(tmp_path / "run"), persist_every=0, grace_s=60)
    pids: set[int] = set()
    try:
        with hook:
            assert hook.restore() == 0
            hook.step(0)
            hook.wait()
            first = hook.agent_pid()
            assert first is not None
            pids.add(first)
            os.kill(first, signal.SIGKILL)
            assert _wait(lambda: not pid_alive(first))
            hook.step(1)
            hook.wait()
            hook.step(2)  # publishes step 1, in the new agent's slots
            hook.wait()
            second = hook.agent_pid()
            assert second is not None and second != first
            pids.add(second)
            assert hook.stats["agent_restarts"] == 1
            entry = read_table(tmp_path / "run")
            assert entry is not None and entry["step"] == 2
            assert entry["segment"] in _shm(tmp_path / "run")
            # the dead agent's segments were unlinked by its resource tracker: only the new
            # agent's slots are left
            assert len(_shm(tmp_path / "run")) <= 3
        fresh = _model()
        fresh["step"] = -1
        hook2 = CheckpointHook(state=fresh, storage=str(tmp_path / "empty"), run_dir=str(tmp_path / "run"), persist_every=0)
        with hook2:
            assert hook2.restore() == 3
            assert hook2.stats["restored_from"] == "memory"
        assert fresh["step"] == 3
    finally:
        for pid in pids:
            _stop(pid)
        started = hook._agent.process if hook._agent is not None else None
        if started is not None and started.poll() is None:
            _stop(started.pid)
        if started is not None:
            started.wait(DEADLINE)
    assert _wait(lambda: _shm(tmp_path / "run") == [], 10), _shm(tmp_path / "run")


def test_agents_persist_together_and_abandon_a_step_one_of_them_never_got(tmp_path: Path, caplog: Any) -> None:
    """Two agents (threads here, each with its own ``Agent``) persist one checkpoint of the job
    through rank 0's store; a step one agent skipped is abandoned by the other at once (logged,
    nothing committed), and the next step commits."""
    import logging
    import threading
    from datetime import timedelta

    import ckpt
    from agents._agent import Agent, AgentConfig
    from ckpt._state import flatten
    from ckpt.layout import Layout

    store_url = str(tmp_path / "store")
    agents = [Agent(AgentConfig(run_dir=str(tmp_path / f"run{r}"), rank=r, persist_url=store_url, persist_every=4)) for r in range(2)]
    port = agents[0].open_store("127.0.0.1", 0)
    job = {"world_size": 2, "token": "t0", "store": ["127.0.0.1", port], "layout": Layout.grid(dp=2).to_json(), "rules": None, "rank_local": ["rng"], "timeout_s": 120.0}

    def item(rank: int, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        state = {"model": torch.nn.Linear(4, 2), "rng": {"seed": torch.tensor([rank, step])}}
        flat = flatten(state)
        return {"step": step, "tree": flat.tree, "job": dict(job, rank=rank)}, {n: t.detach().clone() for n, t in flat.tensors.items()}

    def rank_fn(rank: int) -> None:
        steps = (4, 8) if rank == 0 else (8,)  # rank 1's trainer never handed over step 4
        for step in steps:
            agents[rank]._persist(*item(rank, step))

    caplog.set_level(logging.INFO, logger="agents")
    t0 = time.monotonic()
    threads = [threading.Thread(target=rank_fn, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads), "an agent hangs"
    assert timedelta(seconds=time.monotonic() - t0) < timedelta(seconds=job["timeout_s"])  # abandoned, not timed out
    assert "rank 1 skipped step 4" in caplog.text
    assert ckpt.list_steps(store_url) == [8]
    _, manifest = ckpt.open_manifest(store_url)
    assert manifest.world_size == 2 and "rank00001/rng.seed" in manifest.tensors
    assert agents[0]._persisted == agents[1]._persisted == 8


def test_agent_store_port_is_outside_the_ephemeral_range_and_a_taken_one_is_named(tmp_path: Path) -> None:
    """Rank 0's agent hosts the agents' store on a port the kernel does not hand out to outgoing
    connections (so it is still free when a restarted agent asks for it again); a port that is
    taken gets an error naming it, not another port the other agents would not know."""
    from agents._agent import Agent, AgentConfig
    from agents._ports import ephemeral_range

    agent = Agent(AgentConfig(run_dir=str(tmp_path / "run0")))
    port = agent.open_store("127.0.0.1", 0)
    lo, hi = ephemeral_range()
    assert not lo <= port <= hi
    assert agent.open_store("127.0.0.1", 0) == port  # an open store is kept

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("", 0))
        taken.listen()
        other = Agent(AgentConfig(run_dir=str(tmp_path / "run1")))
        busy = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"port {busy}.*store_port"):
            other.open_store("127.0.0.1", busy)


def test_a_stopped_agent_never_holds_up_training(tmp_path: Path, caplog: Any) -> None:
    """SIGSTOP the agent mid-run (it neither answers nor copies): the training loop goes on,
    snapshots it cannot take are skipped and logged, nothing waits on the agent; after SIGCONT
    snapshots are published and persisted again. (If a step waited on the stopped agent, the
    loop would never reach the SIGCONT: a watchdog continues the agent after a generous
    deadline and the test fails.)"""
    import logging
    import threading

    import ckpt
    from ckpt.hook import CheckpointHook

    caplog.set_level(logging.WARNING, logger="ckpt")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    run, store = tmp_path / "run", tmp_path / "store"
    # persist_wait_s longer than the watchdog: a publish waiting on the agent would show
    hook = CheckpointHook({"model": model, "optim": opt}, storage=str(store), run_dir=str(run), persist_every=2, grace_s=60, persist_wait_s=2 * DEADLINE)

    def train(steps: range) -> None:
        for step in steps:
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
            hook.step(step)

    agent, rescued = None, threading.Event()
    try:
        with hook:
            assert hook.restore() == 0
            train(range(0, 1))  # one snapshot: the agent has made the slots (and persisted it)
            hook.wait()
            agent = hook.agent_pid()
            assert agent is not None
            os.kill(agent, signal.SIGSTOP)

            def watchdog() -> None:
                if not done_stopped.wait(DEADLINE):
                    rescued.set()
                    os.kill(agent, signal.SIGCONT)

            done_stopped = threading.Event()
            threading.Thread(target=watchdog, daemon=True).start()
            train(range(1, 40))  # the agent is stopped all along
            done_stopped.set()
            assert not rescued.is_set(), "a training step waited for the stopped agent"
            published = hook.stats["published"]
            os.kill(agent, signal.SIGCONT)
            train(range(40, 60))
            hook.wait()
            assert hook.stats["published"] > published
        assert "skipped" in caplog.text
        assert _wait(lambda: any(s >= 40 for s in ckpt.list_steps(str(store)))), ckpt.list_steps(str(store))
    finally:
        if agent is not None:
            os.kill(agent, signal.SIGCONT)
            _stop(agent)
    assert _wait(lambda: _shm(run) == [], 10), _shm(run)
