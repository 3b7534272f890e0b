"""A full ``/dev/shm`` is an error, never a SIGBUS: the agent reserves a slot's pages before
touching them, refuses the request with a message saying what to do, and keeps serving. An
agent's own limit (``shm_limit``) is refused the same way, and the hook over it logs each failed
snapshot, keeps training, and raises after ``max_failures`` in a row."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt.snapshot._shm import SharedMemoryFullError, create_segment, job_id, pid_alive
from test_agent import DEADLINE, _request, _shm, _start_agent, _stop, _wait


def _too_big() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_blocks * st.f_frsize + (1 << 30)  # more than the whole filesystem holds


def test_create_segment_on_a_full_dev_shm_raises_and_leaves_nothing(tmp_path: Path) -> None:
    name = f"ckpt-{job_id(tmp_path)}-r0-s0-g1"
    with pytest.raises(SharedMemoryFullError) as info:
        create_segment(name, _too_big())
    msg = str(info.value)
    assert name in msg and "/dev/shm" in msg and "free" in msg
    assert _shm(tmp_path) == []


def test_agent_refuses_a_slot_that_does_not_fit_and_keeps_serving(tmp_path: Path) -> None:
    (tmp_path / "trainer-r0.pid").write_text(str(os.getpid()))
    p = _start_agent(tmp_path, grace_s=60)
    try:
        sock = tmp_path / "agent-r0.sock"
        resp = _request(sock, {"op": "alloc", "slot": 0, "nbytes": _too_big()})
        assert resp["ok"] is False and "/dev/shm" in resp["error"]
        assert p.poll() is None  # alive: no SIGBUS
        name = _request(sock, {"op": "alloc", "slot": 0, "nbytes": 4096})["name"]
        assert _shm(tmp_path) == [name.lstrip("/")]
    finally:
        _stop(p.pid)
        p.wait(60)
    assert _shm(tmp_path) == []


def test_agent_limit_refuses_a_slot_past_it_naming_the_option(tmp_path: Path) -> None:
    from agents._agent import Agent, AgentConfig

    agent = Agent(AgentConfig(run_dir=str(tmp_path), shm_limit=3 * 4096))
    try:
        agent.alloc(0, 4096)
        agent.alloc(1, 4096)
        agent.alloc(0, 2 * 4096)  # replaces slot 0's segment: its old size does not count
        with pytest.raises(SharedMemoryFullError, match=r"slot 2 needs .* shm_limit \(--shm-limit\)"):
            agent.alloc(2, 4096)
        assert len(_shm(tmp_path)) == 2
    finally:
        agent._unlink_all()
    assert _shm(tmp_path) == []


def test_hook_over_its_shm_limit_logs_keeps_training_and_raises_after_max_failures(tmp_path: Path, caplog: Any) -> None:
    """Every slot the hook asks for is over its agent's limit: each failed snapshot is logged
    with the agent's reason, the training loop goes on, and the third failure in a row raises
    ``SnapshotFailedError`` from ``step()`` (policy ``max_failures=3``). The agent lives on."""
    from ckpt.hook import CheckpointHook
    from ckpt.snapshot import SnapshotFailedError, SnapshotPolicy

    caplog.set_level(logging.ERROR, logger="ckpt")
    state = {"w": torch.zeros(1 << 16), "step": 0}  # 256 KiB of tensor: over a 64 KiB limit
    run = tmp_path / "run"
    hook = CheckpointHook(state, storage=str(tmp_path / "store"), run_dir=str(run), persist_every=0, grace_s=60, shm_limit=64 << 10, policy=SnapshotPolicy(max_failures=3))
    trained, agent = [], None
    try:
        with pytest.raises(SnapshotFailedError, match="3 snapshots in a row failed") as info:
            with hook:
                assert hook.restore() == 0
                agent = hook.agent_pid()
                for step in range(10):
                    state["w"].add_(1.0)  # a training step
                    state["step"] = step
                    trained.append(step)
                    hook.step(step)
                    engine = hook._engine
                    assert engine is not None and _wait(lambda: engine.stats["failed"] >= step + 1), engine.stats
        assert trained == [0, 1, 2, 3]  # failures of steps 0-2 logged, raised at step 3
        assert "shm_limit" in str(info.value.__cause__)
        logged = [r.getMessage() for r in caplog.records if "snapshot failed" in r.getMessage()]
        assert len(logged) == 2 and all("shm_limit" in m for m in logged), logged
        assert agent is not None and pid_alive(agent)  # refused, not crashed
    finally:
        if agent is not None:
            _stop(agent)
        started = hook._agent.process if hook._agent is not None else None
        if started is not None:
            started.wait(DEADLINE)
    assert _shm(run) == []
