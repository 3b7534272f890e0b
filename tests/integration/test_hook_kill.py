"""The hook and its agent with real processes: a trainer killed with SIGKILL (before, during and
after a snapshot copy, or idle after one: published by the copier) is restarted, reattaches to its agent, restores from shared memory with no
storage I/O, and continues with the same losses bit for bit; the agent persists every M-th step;
the agent exits after its grace period and leaves no /dev/shm segment.

Run as a script, this file is the trainer (``python test_hook_kill.py --run-dir ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

DEADLINE = 120.0
STEPS = 14


# ---------------------------------------------------------------------------------- the trainer
def _train(args: argparse.Namespace) -> int:
    import logging

    import numpy as np
    import torch

    from ckpt.hook import CheckpointHook
    from ckpt.snapshot import SnapshotPolicy

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    data = {"pos": 0}
    hook = CheckpointHook(
        state={"model": model, "optim": opt, "sched": sched, "data": data},
        storage=args.storage,
        run_dir=args.run_dir,
        persist_every=args.persist_every,
        grace_s=args.grace_s,
        # every step snapshotted, every persist step handed over: wait for a slot rather than
        # skip when the agent lags (its first save imports and warms up while steps take ms)
        policy=SnapshotPolicy(backpressure="wait"),
    )
    out = open(args.out, "a")
    with hook:
        start = hook.restore()
        out.write(json.dumps({"restored": start, "from": hook.stats["restored_from"], "pid": os.getpid()}) + "\n")
        out.flush()
        for step in range(start, args.steps):
            # the batch comes from numpy's and python's global RNG, dropout from torch's
            x = torch.from_numpy(np.random.standard_normal((32, 64)).astype(np.float32)) * random.uniform(0.5, 1.5)
            y = x.sum(dim=1, keepdim=True).tanh()
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if step == args.kill_at and args.kill_when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            opt.step()
            sched.step()
            data["pos"] += 32
            out.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
            out.flush()
            hook.step(step)
            if step == args.kill_at and args.kill_when == "during":
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.kill_at and args.kill_when == "after":
                hook.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.kill_at and args.kill_when == "idle":
                # no further step()/wait(): the copier publishes the snapshot when it completes
                _wait_published(Path(args.run_dir), step)
                os.kill(os.getpid(), signal.SIGKILL)
    out.write(json.dumps({"done": True}) + "\n")
    out.close()
    return 0


def _wait_published(run_dir: Path, step: int, timeout: float = 60.0) -> None:
    from ckpt.snapshot._shm import read_table

    deadline = time.monotonic() + timeout
    while (read_table(run_dir) or {}).get("step") != step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} not published within {timeout} s")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------- helpers
def _shm_names(run_dir: Path) -> list[str]:
    from ckpt.snapshot._shm import job_id

    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"ckpt-{job_id(run_dir)}-"))


def _run_trainer(run_dir: Path, storage: Path, out: Path, *, kill_at: int = -1, kill_when: str = "none", persist_every: int = 0, grace_s: float = 3.0) -> int:
    cmd = [sys.executable, __file__, "--run-dir", str(run_dir), "--storage", str(storage), "--out", str(out), "--steps", str(STEPS), "--kill-at", str(kill_at), "--kill-when", kill_when, "--persist-every", str(persist_every), "--grace-s", str(grace_s)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(run_dir.parent / "trainer.log", "ab"))
    try:
        return p.wait(DEADLINE)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _losses(out: Path) -> dict[int, str]:
    return {r["step"]: r["loss"] for r in _records(out) if "step" in r}


def _agent_pid(run_dir: Path, rank: int = 0) -> Optional[int]:
    try:
        return int((run_dir / f"agent-r{rank}.pid").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    from ckpt.snapshot._shm import pid_alive

    return pid_alive(pid)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _cleanup(run_dir: Path, pids: set[int]) -> None:
    """Kill the agents the test started (by pid) and check nothing is left."""
    pid = _agent_pid(run_dir)
    if pid is not None:
        pids.add(pid)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not _wait_gone(pid, 20):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)


def _assert_clean(run_dir: Path, pids: set[int]) -> None:
    deadline = time.monotonic() + 10
    while _shm_names(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _shm_names(run_dir) == [], "leaked shared-memory segments"
    assert not [p for p in pids if _alive(p)], "leaked agent processes"


# ---------------------------------------------------------------------------------- tests
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """The losses of an uninterrupted run."""
    base = tmp_path_factory.mktemp("ref")
    run_dir, out = base / "run", base / "losses.jsonl"
    run_dir.mkdir()
    pids: set[int] = set()
    try:
        assert _run_trainer(run_dir, base / "store", out, grace_s=0.5) == 0
        pids.add(_agent_pid(run_dir) or -1)
    finally:
        _cleanup(run_dir, pids)
    _assert_clean(run_dir, {p for p in pids if p > 0})
    losses = _losses(out)
    assert sorted(losses) == list(range(STEPS))
    return losses


@pytest.mark.parametrize("when", ["before", "during", "after", "idle"])
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_restores_from_agent_memory_bit_exact(tmp_path: Path, reference: dict[int, str], when: str, seed: int) -> None:
    kill_at = random.Random(f"{when}-{seed}").randrange(3, STEPS - 2)
    run_dir, out1, out2 = tmp_path / "run", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_dir.mkdir()
    empty = tmp_path / "empty-store"
    empty.mkdir()
    pids: set[int] = set()
    try:
        rc = _run_trainer(run_dir, tmp_path / "store", out1, kill_at=kill_at, kill_when=when, grace_s=60)
        assert rc == -signal.SIGKILL
        agent = _agent_pid(run_dir)
        assert agent is not None and _alive(agent), "the agent must outlive its trainer"
        pids.add(agent)
        # restart, storage pointing at an empty dir: the restore must come from memory
        assert _run_trainer(run_dir, empty, out2, grace_s=60) == 0
        assert _agent_pid(run_dir) == agent, "the restarted trainer reattached to the same agent"
        head = _records(out2)[0]
        assert head["from"] == "memory", head
        assert 1 <= head["restored"] <= kill_at + 1
        if when in ("after", "idle"):
            assert head["restored"] == kill_at + 1
        assert os.listdir(empty) == []
        after = _losses(out2)
        assert sorted(after) == list(range(head["restored"], STEPS))
        for step, loss in after.items():
            assert loss == reference[step], f"step {step} after resume differs"
        for step, loss in _losses(out1).items():
            assert loss == reference[step]
    finally:
        _cleanup(run_dir, pids)
    _assert_clean(run_dir, pids)


def test_agent_persists_every_mth_step_and_exits_after_grace(tmp_path: Path, reference: dict[int, str]) -> None:
    import ckpt

    run_dir, store, out = tmp_path / "run", tmp_path / "store", tmp_path / "a.jsonl"
    run_dir.mkdir()
    pids: set[int] = set()
    try:
        t0 = time.monotonic()
        assert _run_trainer(run_dir, store, out, persist_every=4, grace_s=2.0) == 0
        agent = _agent_pid(run_dir)
        assert agent is not None
        pids.add(agent)
        assert _wait_gone(agent, DEADLINE), "the agent must exit once the trainer is gone for the grace period"
        assert time.monotonic() - t0 >= 2.0
        logs = "".join(f.read_text()[-4000:] for f in (run_dir / "agent-r0.log", tmp_path / "trainer.log") if f.exists())
        assert ckpt.list_steps(str(store)) == [0, 4, 8, 12], logs
        for step in (0, 4, 8, 12):
            report = ckpt.verify(str(store), step=step)
            assert report.ok and report.chunks > 0, report
        assert not run_dir.joinpath("agent-r0.sock").exists()
        assert _shm_names(run_dir) == []
        # a new job with no agent memory restores from storage and continues bit-exactly
        run2, out2 = tmp_path / "run2", tmp_path / "b.jsonl"
        run2.mkdir()
        assert _run_trainer(run2, store, out2, grace_s=0.5) == 0
        pids.add(_agent_pid(run2) or -1)
        head = _records(out2)[0]
        assert head == {"restored": 13, "from": "storage", "pid": head["pid"]}
        assert _losses(out2) == {13: reference[13]}
        _cleanup(run2, pids)
        _assert_clean(run2, {p for p in pids if p > 0})
    finally:
        _cleanup(run_dir, pids)
    _assert_clean(run_dir, {p for p in pids if p > 0})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--kill-when", default="none")
    ap.add_argument("--persist-every", type=int, default=0)
    ap.add_argument("--grace-s", type=float, default=3.0)
    sys.exit(_train(ap.parse_args()))
