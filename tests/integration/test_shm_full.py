"""A full ``/dev/shm`` is an error, never a SIGBUS: the agent reserves a slot's pages before
touching them, refuses the request with a message saying what to do, and keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt.snapshot._shm import SharedMemoryFullError, create_segment, job_id
from test_agent import _request, _shm, _start_agent, _stop


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
