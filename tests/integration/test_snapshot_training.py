"""Snapshot every step of a deterministic training loop, restore the last complete snapshot into
fresh objects, continue: the losses equal the uninterrupted run's bit for bit."""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from ckpt.snapshot import SnapshotEngine, SnapshotPolicy, restore_from_snapshot

DEADLINE = 120.0
STEPS = 12


class TorchRNG:
    """The global torch CPU generator as a stateful object (captured at each snapshot)."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.random.get_rng_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        torch.random.set_rng_state(sd["torch"])


def _build(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    return {"model": model, "optim": opt, "sched": sched, "rng": TorchRNG(), "step": -1, "data": {"epoch": 0, "pos": 0}}


def _step(state: dict[str, Any], step: int) -> float:
    model, opt, sched = state["model"], state["optim"], state["sched"]
    x = torch.randn(16, 32)  # from the global RNG: restored with the snapshot
    y = x[:, :1].sin()
    opt.zero_grad()
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    sched.step()
    state["step"] = step
    state["data"]["pos"] += 16
    return float(loss.detach())


def _bits(losses: list[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in losses]


def _slow_copy(dst: np.ndarray, src: np.ndarray) -> None:
    time.sleep(0.002)  # slower than a step: the guard has to hold optimizer steps
    np.copyto(dst, src)


@pytest.mark.parametrize("slow", [False, True], ids=["plain", "slow-copier"])
def test_resume_from_last_complete_snapshot_is_bit_exact(slow: bool) -> None:
    base_state = _build(0)
    baseline = [_step(base_state, s) for s in range(STEPS)]

    state = _build(0)
    engine = SnapshotEngine(state, policy=SnapshotPolicy(backpressure="wait", wait_timeout_s=DEADLINE), copy_fn=_slow_copy if slow else None)
    with engine:
        engine.register_guard(state["optim"])
        losses = []
        for s in range(8):
            losses.append(_step(state, s))
            assert engine.snapshot(s)
        assert _bits(losses) == _bits(baseline[:8])  # snapshots do not perturb training
        snap = engine.latest_complete()
        assert snap is not None
        with snap:
            last = snap.step
            assert snap.tree is not None
            fresh = _build(123)  # other weights, other RNG: everything must come from the snapshot
            restore_from_snapshot(fresh, snap)
        engine.wait(timeout=DEADLINE)
    assert last >= 0
    assert fresh["step"] == last and fresh["data"]["pos"] == 16 * (last + 1)
    resumed = [_step(fresh, s) for s in range(last + 1, STEPS)]
    assert _bits(resumed) == _bits(baseline[last + 1 :])


def test_snapshot_every_step_no_thread_leak() -> None:
    before = threading.active_count()
    state = _build(1)
    with SnapshotEngine(state) as engine:
        engine.register_guard(state["optim"])
        for s in range(5):
            _step(state, s)
            engine.snapshot(s)
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.step == 4
        assert engine.memory_bytes > 0
    assert threading.active_count() == before
