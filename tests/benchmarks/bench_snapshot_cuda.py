"""Per-step snapshots of GPU training state: the device-to-host copy against the copy engine.

Usage::

    python tests/benchmarks/bench_snapshot_cuda.py [--gib 2.0] [--steps 8] [--rounds 3] [--json bench-results/snapshot-cuda.json]

Needs CUDA (``--device cpu`` runs the same measurements on the CPU, as a check of the script).
A model of Linear layers with fused AdamW state of about ``--gib`` GiB trains on the device.

1. **Copy engine**: the median time of one ``copy_(non_blocking=True)`` of that many bytes from
   device memory into a reused pinned host buffer, synchronized: the bandwidth limit of any
   device-to-host snapshot on this machine.
2. **Ours, idle**: ``SnapshotEngine`` with ``PinnedBuffers`` (side stream, one event per tensor),
   ``snapshot()`` + ``wait()`` with nothing else running: device-to-host copies plus the host
   checksums. Reported as bandwidth and its ratio to (1).
3. **During training** (a batch calibrated so a step takes ``--step-over-copy`` times (1)):
   throughput with no checkpointing, with a snapshot every step (guard on the optimizer: the
   compute stream waits on the copies' events, the host never blocks), and with DCP
   ``async_save`` every step; time blocked per step.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gbps, machine, markdown_table, median, write_json  # noqa: E402
from bench_snapshot import WIDTH, DcpAsyncSaver, build, state_bytes, train_step  # noqa: E402

from ckpt.snapshot import PinnedBuffers, SnapshotEngine, SnapshotPolicy  # noqa: E402

DEFAULT_JSON = Path("bench-results/snapshot-cuda.json")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_buffer(nbytes: int, device: str) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    buf.fill_(0)  # mapped before it is timed
    return buf


def copy_engine_s(nbytes: int, device: str, runs: int = 7) -> float:
    """Median seconds of one device-to-host copy of ``nbytes`` into a reused pinned buffer."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = host_buffer(nbytes, device)
    times = []
    for i in range(runs + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        if i:  # the first one warms up
            times.append(time.perf_counter() - t0)
    return median(times)


def snapshot_idle_s(model: torch.nn.Module, opt: torch.optim.Optimizer, device: str, runs: int = 7) -> tuple[float, float]:
    """Median seconds of ``snapshot()`` + ``wait()`` with training idle, and the median of the
    copier's checksum time within it."""
    buffers = PinnedBuffers() if device == "cuda" else None
    walls, sums = [], []
    with SnapshotEngine({"model": model, "optim": opt}, buffers=buffers) as engine:
        for i in range(runs + 2):  # the first two allocate and pre-fault both slots
            sync(device)
            before = engine.stats["checksum_s"]
            t0 = time.perf_counter()
            engine.snapshot(i)
            engine.wait()
            if i >= 2:
                walls.append(time.perf_counter() - t0)
                sums.append(engine.stats["checksum_s"] - before)
    return median(walls), median(sums)


def calibrate(model: torch.nn.Module, opt: torch.optim.Optimizer, device: str, want_s: float) -> int:
    """The batch whose training step takes about ``want_s``."""
    batch = 64
    for _ in range(10):
        x = torch.randn(batch, WIDTH, device=device)
        train_step(model, opt, x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            train_step(model, opt, x)
        sync(device)
        step_s = (time.perf_counter() - t0) / 3
        if abs(step_s - want_s) / want_s < 0.2:
            break
        batch = max(1, int(batch * want_s / step_s))
    return batch


def run_mode(mode: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, device: str, steps: int, warmup: int, tmp: Path) -> dict[str, Any]:
    state = {"model": model, "optim": opt, "step": 0}
    blocked: list[float] = []
    engine = None
    pending: Any = None
    save: Callable[[int], None]
    if mode == "none":

        def save(step: int) -> None:
            pass

    elif mode == "snapshot":
        engine = SnapshotEngine(state, buffers=PinnedBuffers() if device == "cuda" else None, policy=SnapshotPolicy(backpressure="wait")).start()
        engine.register_guard(opt)

        def save(step: int) -> None:
            state["step"] = step
            t0 = time.perf_counter()
            engine.snapshot(step)
            blocked.append(time.perf_counter() - t0)

    elif mode == "dcp_async":
        save = pending = DcpAsyncSaver(model, opt, tmp, blocked)

    else:
        raise ValueError(mode)
    try:
        for i in range(warmup):
            train_step(model, opt, x)
            save(i)
        if engine is not None:
            engine.wait()
            guard0 = engine.stats["blocked_s"]
        sync(device)
        blocked.clear()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            train_step(model, opt, x)
            save(i)
        sync(device)
        wall = time.perf_counter() - t0
        if pending is not None:
            pending.finish()
        guard = 0.0
        if engine is not None:
            engine.wait()
            guard = engine.stats["blocked_s"] - guard0  # host waits in guards (none expected on CUDA)
    finally:
        if engine is not None:
            engine.close()
    per_step = (sum(blocked) + guard) / steps
    return {"mode": mode, "steps_per_s": steps / wall, "blocked_per_step_s": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=2.0, help="state size (params + AdamW moments), GiB")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-over-copy", type=float, default=4.0, help="target step time / copy-engine time")
    parser.add_argument("--modes", default="none,snapshot,dcp_async")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_snapshot_cuda: no CUDA device here (pass --device cpu to check the script on the CPU)")

    torch.manual_seed(0)
    model, opt = build(args.gib)
    model.to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    train_step(model, opt, torch.randn(1, WIDTH, device=args.device))  # creates the Adam state
    nbytes = state_bytes(model, opt)
    plain_s = copy_engine_s(nbytes, args.device)
    ours_s, checksum_s = snapshot_idle_s(model, opt, args.device)
    batch = calibrate(model, opt, args.device, args.step_over_copy * plain_s)
    x = torch.randn(batch, WIDTH, device=args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-cuda-"))
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                r = run_mode(mode, model, opt, x, args.device, args.steps, args.warmup, tmp)
                runs.setdefault(mode, []).append(r)
                sys.stderr.write(f"batch {batch} {mode}: {r['steps_per_s']:.3f} steps/s, blocked {r['blocked_per_step_s'] * 1e3:.2f} ms/step\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {m: sorted(rs, key=lambda r: r["steps_per_s"])[(len(rs) - 1) // 2] for m, rs in runs.items()}
    none = results.get("none", {}).get("steps_per_s")

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}: state {nbytes / 2**30:.2f} GiB, batch {batch}\n")
    rows = [
        ["device-to-host copy into pinned memory (copy engine)", f"{plain_s * 1e3:.1f} ms", f"{gbps(nbytes, plain_s):.2f} GB/s", "1.000"],
        ["snapshot() + wait(), training idle (incl. checksums)", f"{ours_s * 1e3:.1f} ms", f"{gbps(nbytes, ours_s):.2f} GB/s", f"{plain_s / ours_s:.3f}"],
        ["  of which host checksums", f"{checksum_s * 1e3:.1f} ms", "", ""],
    ]
    print(markdown_table(["copy", "time", "bandwidth", "vs copy engine"], rows, right=[False, True, True, True]))
    print()
    rows = [[m, f"{r['steps_per_s']:.3f}", f"{r['steps_per_s'] / none:.3f}" if none else "", f"{r['blocked_per_step_s'] * 1e3:.2f}"] for m, r in results.items()]
    print(markdown_table(["mode", "steps/s", "vs none", "blocked ms/step"], rows, right=[False, True, True, True]))
    summary = {
        "device": name,
        "state_bytes": nbytes,
        "batch": batch,
        "copy_engine_s": plain_s,
        "copy_engine_gbps": gbps(nbytes, plain_s),
        "snapshot_idle_s": ours_s,
        "snapshot_idle_gbps": gbps(nbytes, ours_s),
        "snapshot_vs_copy_engine": plain_s / ours_s,
        "checksum_s": checksum_s,
    }
    if none and "snapshot" in results:
        summary["throughput_ratio"] = results["snapshot"]["steps_per_s"] / none
    write_json(args.json, {"benchmark": "snapshot-cuda", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "results": results, "runs": runs})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
