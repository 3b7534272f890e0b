"""``examples/train_gpt.py`` runs, persists through its agents, and resumes from agent memory.

Single process, and two-process tensor- and pipeline-parallel jobs under ``torchrun`` (gloo):
a job SIGKILLed mid-training and started again restores from its agents' memory and its
losses match an uninterrupted run bit for bit. Every test stops the agents it started and
checks that no shared-memory segment of its run directories is left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

import ckpt
from ckpt.snapshot._shm import job_id, pid_alive, read_pid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multiprocess"))  # for any --import-mode
import _procs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_gpt.py"
DEADLINE = 300.0  # hang guard of one run; a run takes seconds
# steps take milliseconds here, faster than the agents persist: wait for a slot rather than skip
# a snapshot, so that every persist step is handed over and the persisted steps are known
SMALL = ["--ctx", "16", "--batch", "4", "--backpressure", "wait"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(tmp_path: Path, steps: int) -> str:
    store, run = str(tmp_path / "store"), str(tmp_path / "run")
    cmd = [sys.executable, str(EXAMPLE), "--storage", store, "--run-dir", run, "--steps", str(steps), "--persist-every", "3", *SMALL]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=DEADLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def _stop_agents(run_dirs: Sequence[Path]) -> None:
    """SIGTERM the agent of every ``run_dir/rank<r>``, wait for it, SIGKILL if it lingers."""
    pids = [pid for d in run_dirs for f in sorted(d.glob("rank*/agent-r*.pid")) if (pid := read_pid(f)) is not None]
    assert _procs.terminate_pids(pids) == []


def _leaked_segments(run_dirs: Sequence[Path]) -> list[str]:
    jobs = {job_id(d) for run in run_dirs for d in run.glob("rank*")} | {job_id(run) for run in run_dirs}
    return [n for n in os.listdir("/dev/shm") if any(n.startswith(f"ckpt-{j}-") for j in jobs)]


def test_train_gpt_example_persists_and_resumes_from_memory(tmp_path: Path) -> None:
    run = tmp_path / "run" / "rank0"
    agent = None
    try:
        out = _run(tmp_path, 7)
        assert "starting at step 0" in out
        agent = read_pid(run / "agent-r0.pid")
        out = _run(tmp_path, 9)
        assert "starting at step 7 (restored from memory)" in out
        assert read_pid(run / "agent-r0.pid") == agent
        deadline = time.monotonic() + 60
        while ckpt.list_steps(str(tmp_path / "store")) != [0, 3, 6] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ckpt.list_steps(str(tmp_path / "store")) == [0, 3, 6]
        assert ckpt.verify(str(tmp_path / "store")).ok
    finally:
        _stop_agents([tmp_path / "run"])
    assert agent is not None and not pid_alive(agent)
    assert _leaked_segments([tmp_path / "run"]) == []


# ------------------------------------------------------------------------ tensor / pipeline parallel

STEPS = 24
KILL_AFTER = 4  # SIGKILL the trainers once the loss of this step is logged


class Job:
    """One ``torchrun --nproc-per-node 2`` launch of the example; its output goes to a log file."""

    def __init__(self, tmp_path: Path, name: str, parallel: Sequence[str], run_dir: Path, storage: Path, grace_s: float) -> None:
        self.log, self.losses, self.run_dir = tmp_path / f"{name}.log", tmp_path / f"{name}.jsonl", run_dir
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE), *parallel, *SMALL,
               "--storage", str(storage), "--run-dir", str(run_dir), "--steps", str(STEPS), "--persist-every", "5",
               "--grace-s", str(grace_s), "--loss-file", str(self.losses)]  # fmt: skip
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def read_losses(self) -> dict[int, float]:
        if not self.losses.exists():
            return {}
        lines = [json.loads(line) for line in self.losses.read_text().splitlines() if line.endswith("}")]
        return {d["step"]: d["loss"] for d in lines}

    def wait(self, ok: bool = True) -> None:
        try:
            self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job still running after {DEADLINE} s (hang):\n{self.output()[-6000:]}")
        if ok:
            assert self.proc.returncode == 0, self.output()[-6000:]

    def kill_trainers(self) -> None:
        """SIGKILL both trainer processes (their pids come from the hook's pid files)."""
        for rank in range(2):
            pid = read_pid(self.run_dir / f"rank{rank}" / f"trainer-r{rank}.pid")
            assert pid is not None and pid_alive(pid)
            os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2", "--microbatches", "2"]], ids=["tp2", "pp2"])
def test_train_gpt_parallel_killed_resumes_from_memory_bit_exact(tmp_path: Path, parallel: list[str]) -> None:
    runs = [tmp_path / "run-ref", tmp_path / "run"]
    jobs: list[Job] = []
    try:
        ref = Job(tmp_path, "ref", parallel, runs[0], tmp_path / "store-ref", grace_s=1.0)
        jobs.append(ref)
        ref.wait()
        reference = ref.read_losses()
        assert sorted(reference) == list(range(STEPS))

        crashed = Job(tmp_path, "crashed", parallel, runs[1], tmp_path / "store", grace_s=120.0)
        jobs.append(crashed)
        deadline = time.monotonic() + DEADLINE
        while KILL_AFTER not in crashed.read_losses():
            assert crashed.proc.poll() is None, crashed.output()[-6000:]
            assert time.monotonic() < deadline, f"no loss for step {KILL_AFTER} after {DEADLINE} s"
            time.sleep(0.01)
        crashed.kill_trainers()
        crashed.wait(ok=False)
        logged = crashed.read_losses()
        assert crashed.proc.returncode != 0 and max(logged) < STEPS - 1, "the job ended before it was killed"
        assert all(logged[s] == reference[s] for s in logged)

        resumed = Job(tmp_path, "resumed", parallel, runs[1], tmp_path / "store", grace_s=1.0)
        jobs.append(resumed)
        resumed.wait()
        out = resumed.output()
        losses = resumed.read_losses()
        start = min(losses)
        # the newest step every rank had published (snapshots are lazy: maybe a step or two back)
        assert 0 < start <= max(logged) + 1, (start, sorted(logged))
        for rank in range(2):
            assert f"rank {rank}/2 (" in out and f"starting at step {start} (restored from memory)" in out, out[-6000:]
        assert out.count(f"starting at step {start} (restored from memory)") == 2, out[-6000:]
        assert losses == {s: reference[s] for s in range(start, STEPS)}
    finally:
        for job in jobs:
            job.kill()
        _stop_agents(runs)
    assert _leaked_segments(runs) == []


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("train_gpt_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _continue_in_one_process(store: Path, reference: dict[int, float]) -> None:
    """Load the latest checkpoint into a single-process model (another layout), through the
    example's rules, and train to the end: the losses match the parallel reference."""
    ex = _example()
    cfg = ex.Config(vocab=256, ctx=16, layers=2)
    par = ex.Parallel(ex.Layout.single())
    model = ex.build_model(cfg, par, seed=1)  # other weights: the load must replace them all
    opt, sched = ex.build_optimizer(model, STEPS)
    result = ckpt.load({"state": {"model": model, "optim": opt, "sched": sched}}, str(store), layout=par.layout, rules=ex.gpt_rules(cfg))
    data = ex.corpus(50_000, cfg.vocab)
    losses = {}
    for step in range(result.step + 1, STEPS):
        x, y = ex.batch(data, step, 0, 4, cfg.ctx, par)
        losses[step] = ex.train_step(model, opt, sched, x, y, 1)
    # tensor-parallel all-reduces sum in another order: equal up to rounding
    assert losses == pytest.approx({s: reference[s] for s in range(result.step + 1, STEPS)}, rel=1e-5)


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2", "--microbatches", "2"]], ids=["tp2", "pp2"])
def test_train_gpt_parallel_resumes_from_storage(tmp_path: Path, parallel: list[str]) -> None:
    """The agents of both ranks persist one checkpoint of the job; it loads at another layout
    (one process), and a job with a fresh run directory (no agents) restores its latest step
    from storage and continues bit for bit."""
    runs = [tmp_path / "run-ref", tmp_path / "run-fresh"]
    store = tmp_path / "store"
    jobs: list[Job] = []
    try:
        ref = Job(tmp_path, "ref", parallel, runs[0], store, grace_s=1.0)
        jobs.append(ref)
        ref.wait()
        reference = ref.read_losses()
        persisted = list(range(0, STEPS, 5))
        deadline = time.monotonic() + 60
        while ckpt.list_steps(str(store)) != persisted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ckpt.list_steps(str(store)) == persisted
        assert ckpt.verify(str(store)).ok
        _continue_in_one_process(store, reference)

        fresh = Job(tmp_path, "fresh", parallel, runs[1], store, grace_s=1.0)
        jobs.append(fresh)
        fresh.wait(ok=False)
        out = fresh.output()
        assert fresh.proc.returncode == 0, out[-6000:]
        assert out.count(f"starting at step {persisted[-1] + 1} (restored from storage)") == 2, out[-6000:]
        assert fresh.read_losses() == {s: reference[s] for s in range(persisted[-1] + 1, STEPS)}
    finally:
        for job in jobs:
            job.kill()
        _stop_agents(runs)
    assert _leaked_segments(runs) == []
