"""The lazy snapshot engine: guard, values, back-pressure, latched errors, lifecycle.

No test relies on timing luck: the copier is slowed down or held by an injected ``copy_fn``
that waits on events the test controls, and every wait has a generous deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch

from ckpt.snapshot import (
    InProcessBuffers,
    SnapshotEngine,
    SnapshotFailedError,
    SnapshotPolicy,
    restore_from_snapshot,
)
from ckpt.snapshot._buffers import PAGE

DEADLINE = 60.0


@pytest.fixture(autouse=True)
def _no_thread_leak() -> Any:
    before = sum(1 for t in threading.enumerate() if t.name == "ckpt-snapshot-copier")
    yield
    after = sum(1 for t in threading.enumerate() if t.name == "ckpt-snapshot-copier")
    assert after == before, "a snapshot copier thread leaked"


class Gate:
    """A ``copy_fn`` that blocks each copy until the test opens the gate (then copies)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def __call__(self, dst: np.ndarray, src: np.ndarray) -> None:
        self.calls += 1
        self.entered.set()
        assert self.open.wait(DEADLINE), "test never opened the copy gate"
        np.copyto(dst, src)


def slow_copy(delay: float) -> Callable[[np.ndarray, np.ndarray], None]:
    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        time.sleep(delay)
        np.copyto(dst, src)

    return copy


def _model(seed: int = 0, width: int = 64, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, model[0].in_features, generator=g)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _clone_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.state.{pid}.{k}"] = v.clone()
    return out


def _assert_snapshot_equals(snap: Any, expected: dict[str, torch.Tensor]) -> None:
    for name, want in expected.items():
        got = snap.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name  # bit for bit
    assert snap.verify() == []


# ------------------------------------------------------------------------------------------
# the guard
# ------------------------------------------------------------------------------------------
def test_guard_blocks_optimizer_step_until_its_tensors_are_copied() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)  # Adam state exists
    state = {"model": model, "optim": opt}
    gate = Gate()
    with SnapshotEngine(state, copy_fn=gate) as engine:
        engine.register_guard(opt)
        expected = _clone_state(model, opt)
        assert engine.snapshot(1)
        assert gate.entered.wait(DEADLINE)
        stepped = threading.Event()

        def step() -> None:
            _train_step(model, opt, 1)  # the guard must hold this until the gate opens
            stepped.set()

        t = threading.Thread(target=step)
        t.start()
        # the step cannot complete while copies are held: nothing has been copied past entry 0
        assert not stepped.wait(0.5)
        assert torch.equal(model[0].weight, expected["model.0.weight"])
        gate.open.set()
        t.join(DEADLINE)
        assert stepped.is_set()
        engine.wait(timeout=DEADLINE)
        assert not torch.equal(model[0].weight, expected["model.0.weight"])  # the step ran
        with engine.latest_complete() as snap:
            assert snap.step == 1
            _assert_snapshot_equals(snap, expected)
        assert engine.stats["blocked_s"] > 0


def test_guard_protects_with_slow_copier_and_immediate_mutation() -> None:
    model = _model(width=256, layers=8)  # ~2 MB of parameters, 16 tensors, + Adam state
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)
    state = {"model": model, "optim": opt}
    with SnapshotEngine(state, copy_fn=slow_copy(0.01)) as engine:
        engine.register_guard(opt)
        for step in range(1, 4):
            expected = _clone_state(model, opt)
            assert engine.snapshot(step)
            _train_step(model, opt, step)  # right away: the guard must block
            # a raw in-place write, announced through wait_for
            engine.wait_for(model[3].bias, timeout=DEADLINE)
            model[3].bias.data.add_(1.0)
            engine.wait(timeout=DEADLINE)
            with engine.latest_complete() as snap:
                assert snap.step == step
                _assert_snapshot_equals(snap, expected)


def test_guard_returns_at_once_when_nothing_in_flight() -> None:
    model = _model(layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with SnapshotEngine({"model": model}) as engine:
        engine.register_guard(opt)
        engine.snapshot(0)
        engine.wait(timeout=DEADLINE)
        blocked = engine.stats["blocked_s"]
        _train_step(model, opt, 0)
        assert engine.stats["blocked_s"] == blocked  # no wait was even entered


def test_guard_waits_only_for_its_own_tensors() -> None:
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    gate = Gate()
    # b first in copier order: once a's copy is held, b's tensors are all copied
    calls: list[int] = []

    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        calls.append(1)
        if len(calls) > 2:  # b.weight, b.bias copied freely; a.* held
            gate(dst, src)
        else:
            np.copyto(dst, src)

    with SnapshotEngine({"b": b, "a": a}, copy_fn=copy) as engine:
        engine.register_guard(opt_b)
        engine.snapshot(0)
        assert gate.entered.wait(DEADLINE)
        b(torch.ones(1, 8)).sum().backward()
        opt_b.step()  # must not block: a's copy is held, b's is done
        gate.open.set()
        engine.wait(timeout=DEADLINE)


def test_module_guard_protects_buffers_mutated_in_forward() -> None:
    bn = torch.nn.BatchNorm1d(16)
    gate = Gate()
    with SnapshotEngine({"bn": bn}, copy_fn=gate) as engine:
        engine.register_guard(bn)
        expected = bn.running_mean.clone()
        engine.snapshot(0)
        t = threading.Thread(target=lambda: bn(torch.randn(4, 16) + 5))
        t.start()
        gate.open.set()
        t.join(DEADLINE)
        engine.wait(timeout=DEADLINE)
        assert not torch.equal(bn.running_mean, expected)
        with engine.latest_complete() as snap:
            assert torch.equal(snap.tensor("bn.running_mean"), expected)


# ------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------
def test_views_shared_storage_and_plain_values_by_value() -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {
        "t": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],  # non-contiguous with offset
        "row": base[2],  # shares storage
        "base": base,
        "bf16": torch.arange(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3)[:, ::2],
        "step": 7,
        "lr": 0.25,
        "name": "run",
        "rng": torch.random.get_rng_state(),
    }
    want = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.clone()) for k, v in state.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    gate = Gate()
    with SnapshotEngine(state, copy_fn=gate) as engine:
        engine.snapshot(7)
        state["step"] = 8  # plain values are captured at snapshot() time
        gate.open.set()
        engine.wait(timeout=DEADLINE)
        base.add_(100)  # after the copy: does not reach the snapshot
        with engine.latest_complete() as snap:
            for k, v in want.items():
                got = snap.tensor(k)
                assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
            fresh = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
            fresh["np"] = np.zeros((2, 2), dtype=np.int16)
            fresh["step"] = None
            tree = restore_from_snapshot(fresh, snap)
    assert tree["step"] == 7 and fresh["step"] == 7 and fresh["lr"] == 0.25 and fresh["name"] == "run"
    assert torch.equal(fresh["t"], want["t"]) and torch.equal(fresh["rng"], want["rng"])
    assert np.array_equal(fresh["np"], want["np"].numpy())


@pytest.mark.parametrize("algorithm", ["xxh3_64", "crc32c"])
def test_checksums_are_of_the_bytes(algorithm: str) -> None:
    from ckpt.codecs import checksum

    t = torch.arange(300_000, dtype=torch.int32)  # more than one 1 MiB block
    with SnapshotEngine({"t": t}, policy=SnapshotPolicy(checksum=algorithm)) as engine:
        engine.snapshot(0)
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.checksums["t"] == checksum(algorithm, t.numpy().view(np.uint8))
            assert snap.algorithm == algorithm
            snap.buffers["t"][0] ^= 1
            assert snap.verify() == ["t"]
            from ckpt.snapshot import SnapshotCorruptError

            with pytest.raises(SnapshotCorruptError, match="t"):
                restore_from_snapshot({"t": torch.zeros(300_000, dtype=torch.int32)}, snap)


def test_latest_complete_is_none_until_a_snapshot_completes_and_keeps_the_previous() -> None:
    t = torch.zeros(1024)
    gate = Gate()
    with SnapshotEngine({"t": t}, copy_fn=gate) as engine:
        assert engine.latest_complete() is None
        engine.snapshot(0)
        assert gate.entered.wait(DEADLINE)
        assert engine.latest_complete() is None  # copying is not complete
        gate.open.set()
        engine.wait(timeout=DEADLINE)
        gate.open.clear()
        gate.entered.clear()
        t.fill_(1)
        engine.snapshot(1)
        assert gate.entered.wait(DEADLINE)
        with engine.latest_complete() as snap:  # step 1 mid-copy: step 0 is still the latest
            assert snap.step == 0 and float(snap.tensor("t")[0]) == 0.0
        gate.open.set()
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.step == 1 and float(snap.tensor("t")[0]) == 1.0


def test_on_complete_gets_each_snapshot_pinned_as_soon_as_it_is_complete() -> None:
    t = torch.zeros(1024)
    got: list[Any] = []
    seen = threading.Event()

    def on_complete(snap: Any) -> None:
        got.append((snap.step, float(snap.tensor("t")[0]), snap.verify()))
        got.append(snap)  # kept pinned: its slot must not be reused
        seen.set()

    with SnapshotEngine({"t": t}, on_complete=on_complete) as engine:
        engine.snapshot(0)
        assert seen.wait(DEADLINE)  # no wait(), no further snapshot() needed
        assert got[0] == (0, 0.0, [])
        t.fill_(1)
        assert engine.snapshot(1)
        engine.wait(timeout=DEADLINE)
        t.fill_(2)
        # slot of step 0 pinned by the callee, step 1 is the latest: no free slot
        assert not engine.snapshot(2)
        got[1].release()
        assert engine.snapshot(2)
        engine.wait(timeout=DEADLINE)
        assert [g[0] for g in got[::2]] == [0, 1, 2] and got[4][1] == 2.0
        for snap in got[1::2]:
            snap.release()


def test_on_complete_failure_is_logged_and_releases_the_pin(caplog: pytest.LogCaptureFixture) -> None:
    def boom(snap: Any) -> None:
        raise RuntimeError("callback broke")

    with SnapshotEngine({"t": torch.zeros(8)}, on_complete=boom) as engine:
        for step in range(4):  # pins released: slots keep being reused, nothing skipped
            assert engine.snapshot(step)
            engine.wait(timeout=DEADLINE)
    assert "callback broke" in caplog.text


# ------------------------------------------------------------------------------------------
# back-pressure, memory
# ------------------------------------------------------------------------------------------
def test_skip_policy_skips_when_both_buffers_are_busy(caplog: pytest.LogCaptureFixture) -> None:
    t = torch.ones(4096)
    gate = Gate()
    with SnapshotEngine({"t": t}, copy_fn=gate, policy=SnapshotPolicy(backpressure="skip")) as engine:
        gate.open.set()
        assert engine.snapshot(0)
        engine.wait(timeout=DEADLINE)
        gate.open.clear()
        with engine.latest_complete() as held:  # slot A pinned by a consumer
            assert engine.snapshot(1)  # slot B: copying, held by the gate
            with caplog.at_level(logging.WARNING, logger="ckpt.snapshot"):
                assert not engine.snapshot(2)
            assert "skipped" in caplog.text
            assert engine.stats["skipped"] == 1
            assert held.step == 0
        gate.open.set()
        engine.wait(timeout=DEADLINE)
        assert engine.snapshot(3)  # a slot is free again
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.step == 3


def test_wait_policy_waits_for_a_free_slot() -> None:
    t = torch.ones(4096)
    gate = Gate()
    with SnapshotEngine({"t": t}, copy_fn=gate, policy=SnapshotPolicy(backpressure="wait")) as engine:
        assert engine.snapshot(0)
        assert engine.snapshot(1)  # both slots busy now
        done = threading.Event()
        result: list[bool] = []
        th = threading.Thread(target=lambda: (result.append(engine.snapshot(2)), done.set()))
        th.start()
        assert not done.wait(0.3)  # waiting for a slot
        gate.open.set()
        th.join(DEADLINE)
        assert result == [True]
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.step == 2
        assert engine.stats["skipped"] == 0


def test_wait_policy_with_timeout_skips() -> None:
    gate = Gate()
    with SnapshotEngine({"t": torch.ones(8)}, copy_fn=gate, policy=SnapshotPolicy(backpressure="wait", wait_timeout_s=0.05)) as engine:
        assert engine.snapshot(0) and engine.snapshot(1)
        assert not engine.snapshot(2)
        gate.open.set()


def test_memory_is_bounded_by_two_slots_and_reused() -> None:
    t = torch.ones(100_000)
    with SnapshotEngine({"t": t}) as engine:
        assert engine.memory_bytes == 0
        for step in range(10):
            engine.snapshot(step)
            engine.wait(timeout=DEADLINE)
        slot = (t.numel() * 4 + PAGE - 1) // PAGE * PAGE
        assert engine.memory_bytes == 2 * slot
    assert engine.memory_bytes == 0  # close() frees


def test_buffers_are_prefaulted_and_reused() -> None:
    bufs = InProcessBuffers()
    a = bufs.allocate(0, 10_000)
    assert a.size >= 10_000 and a.size % PAGE == 0
    assert bufs.allocate(0, 5_000) is a
    b = bufs.allocate(0, 20_000)
    assert b.size >= 20_000 and bufs.memory_bytes == b.size
    bufs.close()
    assert bufs.memory_bytes == 0


# ------------------------------------------------------------------------------------------
# errors and lifecycle
# ------------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def _failing_copy(fail: threading.Event) -> Callable[[np.ndarray, np.ndarray], None]:
    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        if fail.is_set():
            raise Boom("disk full")
        np.copyto(dst, src)

    return copy


def test_latched_error_surfaces_exactly_once_at_wait() -> None:
    fail = threading.Event()
    fail.set()
    with SnapshotEngine({"t": torch.ones(8)}, copy_fn=_failing_copy(fail)) as engine:
        assert engine.snapshot(0)
        with pytest.raises(Boom):
            engine.wait(timeout=DEADLINE)
        engine.wait(timeout=DEADLINE)  # already surfaced
        assert engine.latest_complete() is None
        fail.clear()
        assert engine.snapshot(1)
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.step == 1


def test_latched_error_surfaces_once_at_snapshot_and_raises_after_n(caplog: pytest.LogCaptureFixture) -> None:
    fail = threading.Event()
    fail.set()
    t = torch.ones(8)
    with SnapshotEngine({"t": t}, copy_fn=_failing_copy(fail), policy=SnapshotPolicy(max_failures=2)) as engine:
        engine.register_guard(torch.optim.SGD([torch.nn.Parameter(t)], lr=1))
        assert engine.snapshot(0)
        assert engine._inflight == [] or engine._inflight[0].finished.wait(DEADLINE)
        with caplog.at_level(logging.ERROR, logger="ckpt.snapshot"):
            assert engine.snapshot(1)  # failure 1 of 2: logged, not raised
        assert "disk full" in caplog.text
        engine._inflight and engine._inflight[0].finished.wait(DEADLINE)
        with pytest.raises(SnapshotFailedError) as info:
            engine.snapshot(2)  # failure 2 of 2: raised
        assert isinstance(info.value.__cause__, Boom)
        fail.clear()
        assert engine.snapshot(3)  # surfaced once: the next snapshot goes ahead
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            assert snap.step == 3


def test_failed_copy_never_deadlocks_the_guard() -> None:
    fail = threading.Event()
    fail.set()
    model = _model(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with SnapshotEngine({"model": model}, copy_fn=_failing_copy(fail)) as engine:
        engine.register_guard(opt)
        engine.snapshot(0)
        _train_step(model, opt, 0)  # returns although the copy failed
        with pytest.raises(Boom):
            engine.wait(timeout=DEADLINE)


def test_close_joins_finishes_in_flight_and_is_idempotent() -> None:
    engine = SnapshotEngine({"t": torch.ones(8)}, copy_fn=slow_copy(0.05))
    engine.start()
    assert engine.snapshot(0)
    engine.close()
    assert engine._thread is not None and not engine._thread.is_alive()
    assert engine.stats["completed"] == 1
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.snapshot(1)
    with pytest.raises(RuntimeError):
        engine.start()


def test_constructor_starts_nothing_and_snapshot_needs_start() -> None:
    before = threading.active_count()
    engine = SnapshotEngine({"t": torch.ones(8)})
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="start"):
        engine.snapshot(0)
    engine.close()


def test_close_removes_guards() -> None:
    model = _model(layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with SnapshotEngine({"model": model}) as engine:
        engine.register_guard(opt)
        assert len(opt._optimizer_step_pre_hooks) == 1
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SnapshotPolicy(backpressure="drop")
    with pytest.raises(ValueError):
        SnapshotPolicy(max_failures=0)
    with pytest.raises(ValueError):
        SnapshotEngine({}, slots=1)
    with SnapshotEngine({"t": torch.ones(1)}) as engine:
        with pytest.raises(TypeError):
            engine.register_guard(object())
        from ckpt.errors import UnsupportedStateError

        engine._state = {"x": object()}
        with pytest.raises(UnsupportedStateError):
            engine.snapshot(0)
        engine._state = {"q": torch.empty(4, dtype=torch.bits8)}
        with pytest.raises(UnsupportedStateError, match="q"):
            engine.snapshot(1)


def test_restore_mismatch_lists_problems() -> None:
    from ckpt.errors import StateMismatchError

    with SnapshotEngine({"a": torch.ones(3), "b": torch.ones(2)}) as engine:
        engine.snapshot(0)
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            with pytest.raises(StateMismatchError) as info:
                restore_from_snapshot({"a": torch.ones(4), "b": torch.ones(2, dtype=torch.int64)}, snap)
    assert len(info.value.problems) == 2


# ------------------------------------------------------------------------------------------
# lending the copier a core (SnapshotPolicy.yield_threads)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def two_threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _forward_backward(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, model[0].in_features, generator=g)).square().mean().backward()


def test_yield_lowers_threads_while_copying_and_a_gradient_gives_them_back(two_threads: Any) -> None:
    """With ``yield_threads=1`` the training thread runs on one thread from ``snapshot()`` until
    the copy is done; the first gradient accumulated after that gives the second one back (no
    optimizer step or ``wait()`` needed), and the snapshot is still exact."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)
    gate = Gate()
    with SnapshotEngine({"model": model, "optim": opt}, copy_fn=gate, policy=SnapshotPolicy(yield_threads=1)) as engine:
        engine.register_guard(opt)
        expected = _clone_state(model, opt)
        assert engine.snapshot(1)
        assert torch.get_num_threads() == 1, "threads not lent to the copier"
        assert engine.stats["yielded"] == 1
        opt.zero_grad()
        _forward_backward(model, 1)  # still copying: gradient hooks keep the threads lent
        assert torch.get_num_threads() == 1
        gate.open.set()
        deadline = time.monotonic() + DEADLINE
        while engine._host_pending and time.monotonic() < deadline:  # the copier's host part done
            time.sleep(0.005)
        _forward_backward(model, 2)  # a gradient accumulates: the threads come back
        assert torch.get_num_threads() == 2
        opt.step()
        engine.wait(timeout=DEADLINE)
        with engine.latest_complete() as snap:
            _assert_snapshot_equals(snap, expected)


def test_yield_threads_come_back_at_the_optimizer_step_at_wait_and_at_close(two_threads: Any) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)
    state = {"model": model, "optim": opt}
    gate = Gate()
    gate.open.set()
    with SnapshotEngine(state, copy_fn=gate, policy=SnapshotPolicy(yield_threads=1)) as engine:
        engine.register_guard(opt)
        assert engine.snapshot(1) and torch.get_num_threads() == 1
        opt.step()  # the guard waits for the copy, then gives the threads back
        assert torch.get_num_threads() == 2
        assert engine.snapshot(2) and torch.get_num_threads() == 1
        engine.wait(timeout=DEADLINE)
        assert torch.get_num_threads() == 2
        assert engine.snapshot(3) and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2, "close() must give the threads back"


def test_yield_is_off_by_default_never_below_one_thread_and_only_on_the_lending_thread(two_threads: Any) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, opt, 0)
    state = {"model": model, "optim": opt}
    with SnapshotEngine(state) as engine:  # default policy: bit-reproducible, never lends
        assert engine.snapshot(1) and torch.get_num_threads() == 2
        engine.wait(timeout=DEADLINE)
        assert engine.stats["yielded"] == 0
    torch.set_num_threads(1)
    with SnapshotEngine(state, policy=SnapshotPolicy(yield_threads=4)) as engine:
        assert engine.snapshot(1) and torch.get_num_threads() == 1  # nothing to lend
        engine.wait(timeout=DEADLINE)
    torch.set_num_threads(2)
    gate = Gate()
    with SnapshotEngine(state, copy_fn=gate, policy=SnapshotPolicy(yield_threads=1)) as engine:
        assert engine.snapshot(1) and torch.get_num_threads() == 1
        seen: list[int] = []
        other = threading.Thread(target=lambda: (engine._yield.restore(), seen.append(torch.get_num_threads())))
        other.start()
        other.join(DEADLINE)
        assert torch.get_num_threads() == 1, "another thread must not restore the training thread's team"
        gate.open.set()
        engine.wait(timeout=DEADLINE)
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", [-1, 1.5, "1"])
def test_yield_threads_rejects_bad_values(value: Any) -> None:
    with pytest.raises(ValueError, match="yield_threads"):
        SnapshotPolicy(yield_threads=value)


def test_auto_yield_lends_one_thread_only_when_torch_trains_on_every_core(monkeypatch: pytest.MonkeyPatch, two_threads: Any) -> None:
    from ckpt.snapshot import _yield

    monkeypatch.setattr(_yield.os, "sched_getaffinity", lambda pid: {0, 1})
    assert _yield.auto_yield_threads() == 1
    monkeypatch.setattr(_yield.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert _yield.auto_yield_threads() == 0  # a core to spare: the copier takes that one
    torch.set_num_threads(1)
    monkeypatch.setattr(_yield.os, "sched_getaffinity", lambda pid: {0})
    assert _yield.auto_yield_threads() == 0
