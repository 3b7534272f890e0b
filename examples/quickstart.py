"""The ckpt demo: train, checkpoint, "crash", resume bit-exactly, inspect, verify, catch a bad bit.

Run with ``bash scripts/demo.sh`` (sets up .venv on first use) or, inside the venv,
``python examples/quickstart.py [--dir DIR]``. Takes a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import ckpt


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    return model, opt, sched


def train_steps(model, opt, sched, data_gen: torch.Generator, first: int, last: int) -> list[float]:
    losses = []
    for _ in range(first, last):
        x = torch.randn(16, 32, generator=data_gen)
        y = x.sum(dim=1, keepdim=True).sin()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, text=True)
    print(f"$ ckpt {' '.join(args)}    (exit {proc.returncode})")
    print("  " + (proc.stdout + proc.stderr).strip().replace("\n", "\n  "))
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    args = ap.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    url = str(root / "run1")
    shutil.rmtree(url, ignore_errors=True)

    print(f"1. training 20 steps, checkpointing every 5 steps to {url} (keeping the last 3)")
    model, opt, sched = make_run()
    data = torch.Generator().manual_seed(1)
    for step in range(0, 20, 5):
        train_steps(model, opt, sched, data, step, step + 5)
        state = {"model": model, "optim": opt, "sched": sched, "data_rng": data.get_state(), "step": step + 5}
        res = ckpt.save(state, url, step=step + 5, keep_last=3)
        print(f"   saved step {res.step}: {res.logical_bytes} bytes in {res.seconds * 1000:.1f} ms")
    reference = train_steps(model, opt, sched, data, 20, 30)
    print(f"   the uninterrupted run's next losses: {[round(v, 6) for v in reference[:3]]} ...")

    print("2. the trainer 'crashes'; a fresh process builds new objects and restores the latest step")
    model2, opt2, sched2 = make_run(seed=123)  # different init: everything must come from the checkpoint
    target = {"model": model2, "optim": opt2, "sched": sched2, "data_rng": None, "step": None}
    loaded = ckpt.load(target, url)
    data2 = torch.Generator()
    data2.set_state(loaded.state["data_rng"])
    resumed = train_steps(model2, opt2, sched2, data2, loaded.state["step"], 30)
    same = resumed == reference
    print(f"   resumed from step {loaded.step}; losses {'match bit for bit' if same else 'DIFFER'}: "
          f"{[round(v, 6) for v in resumed[:3]]} ...")

    print("3. the CLI")
    cli("ls", "--long", url)
    cli("inspect", url)
    ok = cli("verify", url)

    print("4. one flipped bit in a data object is caught (exit code 3), naming tensor, object and bytes")
    store, manifest = ckpt.open_manifest(url)
    chunk = manifest.tensors["model.0.weight"].chunks[0]
    path = Path(url) / manifest.data_prefix / chunk.object
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset + 100] ^= 0x01
    path.write_bytes(bytes(raw))
    bad = cli("verify", url)
    try:
        ckpt.load(target, url)
        caught = False
    except ckpt.CorruptChunkError as e:
        caught = True
        print(f"   ckpt.load refused it too: {str(e).splitlines()[1].strip()}")
    print(f"\ncheckpoints are in {root}")
    good = same and ok.returncode == 0 and bad.returncode == 3 and caught
    print("demo OK" if good else "demo FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
