"""The per-step snapshot demo: kill -9 a tensor-parallel job mid-training, resume from memory.

Runs ``examples/train_gpt.py`` on two ranks (``torchrun``, gloo, tensor parallel) three times:

1. an uninterrupted reference run;
2. the same job with ``CheckpointHook`` snapshots every step into each rank's agent; both
   trainer processes get SIGKILL in the middle of training;
3. the same command again: each rank reattaches to its agent, both restore the newest step
   they hold from shared memory (no storage I/O), and the losses from there on are compared
   with the reference, bit for bit.

Then it checks the checkpoint the agents persisted meanwhile (``ckpt verify``) and stops the
agents. Run with ``bash scripts/demo.sh`` or, inside the venv, ``python examples/crash_demo.py
[--dir DIR]``. Takes about half a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 30
KILL_AFTER = 12  # the trainers are killed once this step's loss is logged
DEADLINE_S = 300.0


def job(name: str, root: Path, run_dir: Path, storage: Path, grace_s: float) -> tuple[subprocess.Popen, Path]:
    """Start one ``torchrun`` launch of the example; its output goes to ``root/name.log``."""
    losses = root / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "train_gpt.py"), "--tp", "2", "--ctx", "16", "--batch", "4", "--steps", str(STEPS),
           "--storage", str(storage), "--run-dir", str(run_dir), "--persist-every", "10",
           "--grace-s", str(grace_s), "--loss-file", str(losses)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with open(root / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, losses


def read_losses(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in rows}


def finish(proc: subprocess.Popen, name: str, root: Path) -> None:
    try:
        code = proc.wait(DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"{name} still running after {DEADLINE_S} s; see {root / (name + '.log')}")
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {root / (name + '.log')}")


def pid_of(path: Path) -> int:
    return int(path.read_text().split()[0])


def stop_agents(run_dir: Path) -> None:
    """SIGTERM every agent of the run (they unlink their shared memory), wait for them."""
    pids = [pid_of(p) for p in run_dir.glob("rank*/agent-r*.pid")]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where runs, logs and checkpoints go (default: a new temp dir)")
    root = ap.parse_args().dir or Path(tempfile.mkdtemp(prefix="ckpt-crash-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    good = True
    try:
        print(f"5. per-step snapshots survive kill -9: {STEPS} steps of a small GPT, 2 ranks, tensor parallel")
        proc, path = job("reference", root, root / "reference-run", root / "reference-store", grace_s=1.0)
        finish(proc, "reference", root)
        reference = read_losses(path)
        print(f"   the uninterrupted run's losses at steps {KILL_AFTER + 1}..: {[round(reference[s], 5) for s in range(KILL_AFTER + 1, KILL_AFTER + 4)]} ...")

        proc, path = job("killed", root, run_dir, root / "store", grace_s=120.0)
        deadline = time.monotonic() + DEADLINE_S
        while KILL_AFTER not in read_losses(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the job ended or hung before step {KILL_AFTER}; see {root / 'killed.log'}")
            time.sleep(0.01)
        trainers = [pid_of(run_dir / f"rank{r}" / f"trainer-r{r}.pid") for r in range(2)]
        for pid in trainers:
            os.kill(pid, signal.SIGKILL)
        proc.wait(DEADLINE_S)
        last = max(read_losses(path))
        print(f"   SIGKILL both trainers (pids {trainers}) after step {last}; their agents keep the snapshots")

        proc, path = job("resumed", root, run_dir, root / "store", grace_s=120.0)
        finish(proc, "resumed", root)
        out = (root / "resumed.log").read_text()
        resumed = read_losses(path)
        start = min(resumed)
        from_memory = out.count(f"starting at step {start} (restored from memory)") == 2
        same = all(resumed[s] == reference[s] for s in resumed) and sorted(resumed) == list(range(start, STEPS))
        good = from_memory and same
        print(f"   restarted: both ranks restored step {start - 1} from their agents' memory: {'yes' if from_memory else 'NO'}")
        print(f"   losses of steps {start}..{STEPS - 1} {'match the uninterrupted run bit for bit' if same else 'DIFFER from the uninterrupted run'}")

        verify = subprocess.run([sys.executable, "-m", "ckpt", "verify", str(root / "store")], capture_output=True, text=True)
        print(f"$ ckpt verify {root / 'store'}    (exit {verify.returncode})")
        print("  " + (verify.stdout + verify.stderr).strip().replace("\n", "\n  "))
        good = good and verify.returncode == 0
    finally:
        stop_agents(run_dir)
        stop_agents(root / "reference-run")
    print(f"\nruns, logs and checkpoints are in {root}")
    print("crash demo OK" if good else "crash demo FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
