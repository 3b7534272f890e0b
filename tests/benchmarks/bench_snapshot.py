"""Per-step snapshots during CPU training: ours vs DCP ``async_save`` vs ``torch.save``.

Usage::

    python tests/benchmarks/bench_snapshot.py [--gib 0.5] [--steps 8] [--json bench-results/snapshot.json]

A model of Linear layers with AdamW state of about ``--gib`` GiB trains on the CPU with a batch
calibrated so that one step takes ``--step-over-copy`` times the plain copy of the state. It runs
``--steps`` measured steps (after warm-up) in these modes: no checkpointing; a bare background
copy of the same bytes (no checksum, guard or bookkeeping: the floor); ``SnapshotEngine``
snapshot every step (guard on the optimizer), into its in-process buffers and
(``snapshot_shm``) into ``/dev/shm`` segments like the agent's; ``CheckpointHook`` (the agent's
shared memory); ``snapshot_yield``/``hook_yield``: the same with
``SnapshotPolicy(yield_threads=None)`` (the training thread lends the copier a core while it
copies, when torch trains on every core); DCP ``async_save`` every step (to a temporary directory, waiting for the
previous save before starting the next, as DCP requires); and ``torch.save`` every step.
Reported: throughput and its ratio to no checkpointing, time blocked per snapshot (ours:
``snapshot()`` + guard waits; DCP: the ``async_save`` call + waiting for the previous save;
torch.save: the whole save), and the copier's bandwidth (copy + checksum) into our buffers vs a
plain ``numpy.copyto`` between two reused, pre-faulted buffers of the same total size.

Targets (issue #6): throughput >= 0.90x of no checkpointing; blocked time <= 0.1x of DCP's;
copy bandwidth >= 0.7x of the plain copy.

``--threads N`` sets torch's intra-op threads for every mode (default: torch's own choice, one
per core). On a 2-core machine, ``--threads 1`` leaves the copier a core of its own, which is
how a GPU job's host looks to the snapshot (its cores are mostly idle); with every core
training, the copy takes its time from the training threads (see the bare-copy floor).
``BENCH_DEBUG=1`` prints each measured step's blocked time and every slow garbage collection.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timed, gbps, machine, markdown_table, median, write_json  # noqa: E402

from ckpt.snapshot import SnapshotEngine, SnapshotPolicy  # noqa: E402
from ckpt.snapshot._buffers import prefault  # noqa: E402
from ckpt.snapshot._engine import _BLOCK  # noqa: E402
from ckpt.snapshot._shm import SharedMemoryBuffers, _close_quietly, create_segment  # noqa: E402

DEFAULT_JSON = Path("bench-results/snapshot.json")
WIDTH = 2048


def build(gib: float, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    per_layer = WIDTH * WIDTH + WIDTH
    layers = max(1, round(gib * 2**30 / (3 * 4 * per_layer)))  # params + 2 Adam moments, fp32
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused: ~10x faster on CPU
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)
    model(x).square().mean().backward()
    opt.step()


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def copy_bandwidths(model: torch.nn.Module, opt: torch.optim.Optimizer, nbytes: int, runs: int = 7, buffers: Any = None) -> tuple[float, float, int]:
    """With training idle, alternately: the engine's copy of the state into its reused slots
    (copy and checksum: the checksum reads each block first, so the copy alone reads from the
    cache and is not a fair figure on its own) and a plain ``numpy.copyto`` between two reused,
    pre-faulted buffers of the same total size. Returns the median seconds of each and the bytes
    the engine copied per snapshot. Alternating keeps background load on a shared machine from
    favouring one side. ``buffers``: the engine's slots (default: in-process buffers; pass
    ``_LocalSegments()`` for ``/dev/shm`` segments like the agent's)."""
    a = np.empty(nbytes, dtype=np.uint8)
    b = np.empty(nbytes, dtype=np.uint8)
    prefault(a)
    a[:] = 1
    prefault(b)
    ours, plain, copied = [], [], 0
    with SnapshotEngine({"model": model, "optim": opt}, buffers=buffers) as engine:
        for i in range(runs + 2):  # the first two fill (allocate and pre-fault) both slots
            before = engine.stats["copy_s"] + engine.stats["checksum_s"], engine.stats["copied_bytes"]
            engine.snapshot(i)
            engine.wait()
            t0 = time.perf_counter()
            np.copyto(b, a)
            t1 = time.perf_counter()
            if i >= 2:
                ours.append(engine.stats["copy_s"] + engine.stats["checksum_s"] - before[0])
                copied = int(engine.stats["copied_bytes"] - before[1])
                plain.append(t1 - t0)
    return median(ours), median(plain), copied


class _BareCopier:
    """A thread copying ``nbytes`` between two reused, pre-faulted buffers on each ``kick()``
    (waiting for the previous copy first: one copy in flight, like a double-buffered snapshot)."""

    def __init__(self, nbytes: int) -> None:
        import threading

        self.a, self.b = np.empty(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
        prefault(self.a)
        prefault(self.b)
        self._go, self._done, self._stop = threading.Semaphore(0), threading.Event(), False
        self._done.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._go.acquire()
            if self._stop:
                return
            for lo in range(0, self.a.size, _BLOCK):  # the engine's block size
                np.copyto(self.b[lo : lo + _BLOCK], self.a[lo : lo + _BLOCK])
            self._done.set()

    def kick(self) -> None:
        self._done.wait()
        self._done.clear()
        self._go.release()

    def wait(self) -> None:
        self._done.wait()

    def close(self) -> None:
        self.wait()
        self._stop = True
        self._go.release()
        self._thread.join()


class DcpAsyncSaver:
    """DCP ``async_save`` of the model and optimizer every step into two alternating directories
    under ``tmp``, waiting for the previous save first (as DCP requires); the time each call
    blocks is appended to ``blocked``."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, tmp: Path, blocked: list[float]) -> None:
        self.model, self.opt, self.tmp, self.blocked = model, opt, tmp, blocked
        self.pending: Any = None

    def __call__(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        if self.pending is not None:
            self.pending.result()
        d = self.tmp / f"dcp-{step % 2}"
        shutil.rmtree(d, ignore_errors=True)
        self.pending = dcp.async_save({"model": self.model.state_dict(), "optim": self.opt.state_dict(), "step": step}, checkpoint_id=str(d), no_dist=True)
        self.blocked.append(time.perf_counter() - t0)

    def finish(self) -> None:
        """Wait for the last save."""
        if self.pending is not None:
            self.pending.result()


class _LocalSegments(SharedMemoryBuffers):
    """``SharedMemoryBuffers`` over segments this process creates and unlinks (the agent's
    part, in process).

    Creating registers a segment with Python's resource tracker and attaching (by the buffers)
    unregisters it, so ``SharedMemory.unlink()``, which unregisters once more, would make the
    tracker print a ``KeyError``: segments are unlinked by path instead."""

    def __init__(self) -> None:
        self._owned: dict[int, Any] = {}
        self._gen = 0
        super().__init__(self._create)

    def _create(self, slot: int, nbytes: int) -> str:
        self._gen += 1
        name = f"ckpt-bench-{os.getpid()}-s{slot}-g{self._gen}"
        seg = create_segment(name, nbytes)
        old, self._owned[slot] = self._owned.get(slot), seg
        if old is not None:
            _unlink(old)
        return name

    def unlink_all(self) -> None:
        for seg in self._owned.values():
            _unlink(seg)
        self._owned.clear()


def _unlink(seg: Any) -> None:
    os.unlink("/dev/shm/" + seg.name)
    _close_quietly(seg)


def run_mode(mode: str, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, warmup: int, tmp: Path) -> dict[str, Any]:
    state = {"model": model, "optim": opt, "step": 0}
    blocked: list[float] = []
    extra: dict[str, Any] = {}
    engine = None
    pending: Any = None
    save: Callable[[int], None]
    # *_yield: the training thread lends the copier a core while it copies (auto: on when
    # torch trains on every core)
    policy = SnapshotPolicy(backpressure="wait", yield_threads=None if mode.endswith("_yield") else 0)

    if mode == "none":

        def save(step: int) -> None:
            pass

    elif mode == "bare_copy":
        # the floor of any snapshot's cost: the same bytes copied by a background thread
        # between two reused, pre-faulted buffers, with no checksum, no guard, no bookkeeping
        bare = _BareCopier(state_bytes(model, opt))

        def save(step: int) -> None:
            bare.kick()

    elif mode in ("hook", "hook_yield"):
        from ckpt.hook import CheckpointHook

        hook = CheckpointHook(
            state, storage=str(tmp / "hook-storage"), run_dir=str(tmp.parent / (tmp.name + "-run")), persist_every=0, grace_s=5.0, policy=policy
        ).start()

        def save(step: int) -> None:
            state["step"] = step
            hook.step(step)

    elif mode in ("snapshot", "snapshot_shm", "snapshot_yield"):
        # snapshot_shm: the engine's slots are /dev/shm segments (created here, as the agent
        # creates them), to tell the destination memory's cost from the hook's own
        buffers = _LocalSegments() if mode == "snapshot_shm" else None
        engine = SnapshotEngine(state, buffers=buffers, policy=policy).start()
        engine.register_guard(opt)

        def save(step: int) -> None:
            state["step"] = step
            engine.snapshot(step)

    elif mode == "dcp_async":
        save = pending = DcpAsyncSaver(model, opt, tmp, blocked)

    elif mode == "torch_save":

        def save(step: int) -> None:
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, tmp / f"ts-{step % 2}.pt")
            blocked.append(time.perf_counter() - t0)

    else:
        raise ValueError(mode)

    try:
        for i in range(warmup):
            train_step(model, opt, x)
            save(i)
        if mode in ("hook", "hook_yield"):
            hook.wait()
            engine = hook._engine
        if mode == "bare_copy":
            bare.wait()
        if engine is not None:
            engine.wait()
            base = dict(engine.stats)
        blocked.clear()
        # a full collection of this process's ~300k objects takes 0.1-0.3 s: do it now, not
        # inside the measured steps of whichever mode happens to cross the threshold
        gc.collect()
        t_start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            train_step(model, opt, x)
            t0 = time.perf_counter()
            save(i)
            if mode in ("none", "snapshot", "snapshot_shm", "snapshot_yield", "hook", "hook_yield", "bare_copy"):
                blocked.append(time.perf_counter() - t0)
        if mode == "bare_copy":
            bare.wait()  # its last copy counts in the wall time
        wall = time.perf_counter() - t_start
        if pending is not None:
            pending.finish()
        if engine is not None:
            engine.wait()
            st = engine.stats
            guard = st["blocked_s"] - base["blocked_s"]
            if os.environ.get("BENCH_DEBUG"):
                sys.stderr.write(f"  {mode} per-step ms {[round(b * 1e3, 1) for b in blocked]} guard {guard * 1e3:.1f}\n")
            total_blocked = sum(blocked) + guard
            blocked = [total_blocked / steps] * steps  # per snapshot: snapshot() + guard waits
            extra = {
                "guard_blocked_s": guard,
                "snapshot_call_s": st["snapshot_s"] - base["snapshot_s"],
                "copy_s": st["copy_s"] - base["copy_s"],
                "copied_bytes": st["copied_bytes"] - base["copied_bytes"],
                "checksum_s": st["checksum_s"] - base["checksum_s"],
                "completed": st["completed"] - base["completed"],
                "yielded": st["yielded"] - base["yielded"],
                "skipped": st["skipped"] - base["skipped"],
                "memory_bytes": engine.memory_bytes,
            }
    finally:
        if mode in ("hook", "hook_yield"):
            hook.close()
        elif engine is not None:
            engine.close()
            if isinstance(engine_buffers := getattr(engine, "_buffers", None), _LocalSegments):
                engine_buffers.unlink_all()
        if mode == "bare_copy":
            bare.close()
    return {"mode": mode, "steps": steps, "wall_s": wall, "steps_per_s": steps / wall, "blocked_per_step_s": median(blocked) if blocked else 0.0, **extra}


def calibrate(model: torch.nn.Module, opt: torch.optim.Optimizer, step_over_copy: float, copy_s: float) -> int:
    """The batch size whose training step takes about ``step_over_copy`` x ``copy_s``."""
    batch = 16
    for _ in range(8):
        x = torch.randn(batch, WIDTH)
        train_step(model, opt, x)
        step_s = median([timed(lambda: train_step(model, opt, x), collect=False)[0] for _ in range(3)])
        want = step_over_copy * copy_s
        if abs(step_s - want) / want < 0.2:
            break
        batch = max(1, int(batch * want / step_s))
    return batch


def measure(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: int, modes: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every mode ``args.rounds`` times, interleaved; per mode the run with the median
    throughput (with its own figures) and every run's throughput."""
    x = torch.randn(batch, WIDTH)
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    run_dir = tmp.parent / (tmp.name + "-run")
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for _ in range(args.rounds):
            for mode in modes:
                r = run_mode(mode, model, opt, x, args.steps, args.warmup, tmp)
                runs.setdefault(mode, []).append(r)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                os.sync()  # the writeback of one mode's files must not slow the next mode
                sys.stderr.write(f"batch {batch} {mode}: {r['steps_per_s']:.3f} steps/s, blocked {r['blocked_per_step_s'] * 1e3:.1f} ms/step\n")
    finally:
        _stop_agent(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    results = {}
    for mode, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["steps_per_s"])
        results[mode] = dict(rs[(len(rs) - 1) // 2], all_steps_per_s=[r["steps_per_s"] for r in rs])
    return results


def _stop_agent(run_dir: Path) -> None:
    """SIGTERM the hook's agent (it unlinks its shared memory) and wait for it."""
    import signal

    from ckpt.snapshot._shm import pid_alive, read_pid

    pid = read_pid(run_dir / "agent-r0.pid")
    if pid is None or not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=0.5, help="state size (params + AdamW moments), GiB")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=6, help="unmeasured steps per mode (enough to fill every slot once)")
    parser.add_argument("--step-over-copy", type=float, default=4.0, help="target step time / plain copy time")
    parser.add_argument("--modes", default="none,bare_copy,snapshot,snapshot_yield,snapshot_shm,hook,hook_yield,dcp_async,torch_save")
    parser.add_argument("--sweep", default="", help="also run none and those of bare_copy,snapshot,snapshot_yield,hook,hook_yield in --modes at these step/copy ratios, e.g. 2,4,8,16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all modes (median per mode)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads for training (0: torch's default)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if os.environ.get("BENCH_DEBUG"):  # per-step blocked times and slow garbage collections
        t_gc: dict[str, float] = {}

        def _gc_cb(phase: str, info: dict) -> None:
            if phase == "start":
                t_gc["t"] = time.perf_counter()
            elif info["generation"] == 2 or time.perf_counter() - t_gc["t"] > 0.01:
                sys.stderr.write(f"  gc gen{info['generation']} {1e3 * (time.perf_counter() - t_gc['t']):.1f} ms collected {info['collected']}\n")

        gc.callbacks.append(_gc_cb)
    model, opt = build(args.gib)
    x1 = torch.randn(1, WIDTH)
    train_step(model, opt, x1)  # creates the Adam state
    nbytes = state_bytes(model, opt)
    _, copy_s, _ = copy_bandwidths(model, opt, nbytes, runs=3)
    batch = calibrate(model, opt, args.step_over_copy, copy_s)
    results = measure(model, opt, batch, args.modes.split(","), args)
    idle_s, copy_s, idle_bytes = copy_bandwidths(model, opt, nbytes)
    segments = _LocalSegments()
    try:  # into /dev/shm segments, the agent's kind of buffer (the target)
        shm_s, shm_plain_s, _ = copy_bandwidths(model, opt, nbytes, buffers=segments)
    finally:
        segments.unlink_all()

    none = results.get("none", {}).get("steps_per_s")
    rows = []
    for mode, r in results.items():
        ratio = r["steps_per_s"] / none if none else float("nan")
        rows.append([mode, f"{r['steps_per_s']:.3f}", f"{ratio:.3f}", f"{r['blocked_per_step_s'] * 1e3:.1f}"])
    snap = results.get("snapshot")
    summary: dict[str, Any] = {"state_bytes": nbytes, "batch": batch, "torch_threads": torch.get_num_threads(), "plain_copy_s": copy_s, "plain_copy_gbps": gbps(nbytes, copy_s)}
    if none:
        summary["step_s"] = 1 / none
        summary["step_over_copy"] = (1 / none) / copy_s
    for mode in ("bare_copy", "snapshot", "snapshot_yield", "snapshot_shm", "hook", "hook_yield"):
        if mode in results and none:
            summary[f"{mode}_throughput_ratio"] = results[mode]["steps_per_s"] / none
    if snap:
        ours_bw = gbps(idle_bytes, idle_s)
        summary.update(
            copy_gbps_during_training=gbps(snap["copied_bytes"], snap["copy_s"] + snap["checksum_s"]),
            throughput_ratio=snap["steps_per_s"] / none if none else None,
            copy_gbps=ours_bw,
            copy_bw_ratio=ours_bw / summary["plain_copy_gbps"],
            copy_gbps_shm=gbps(idle_bytes, shm_s),
            copy_bw_ratio_shm=shm_plain_s / shm_s,
            checksum_gbps=gbps(snap["copied_bytes"], snap["checksum_s"]),
        )
        if "dcp_async" in results:
            summary["blocked_ratio_vs_dcp"] = snap["blocked_per_step_s"] / results["dcp_async"]["blocked_per_step_s"]
            if "hook" in results:
                summary["hook_blocked_ratio_vs_dcp"] = results["hook"]["blocked_per_step_s"] / results["dcp_async"]["blocked_per_step_s"]
    print(f"state {nbytes / 2**30:.2f} GiB, {torch.get_num_threads()} training threads, batch {batch}, plain copy {copy_s * 1e3:.0f} ms ({summary['plain_copy_gbps']:.2f} GB/s)\n")
    print(markdown_table(["mode", "steps/s", "vs none", "blocked ms/step"], rows, right=[False, True, True, True]))
    print()
    targets = []
    labels = {
        "bare_copy": "throughput ratio, bare background copy (the floor)",
        "snapshot_shm": "throughput ratio, engine into /dev/shm segments (no hook)",
        "snapshot_yield": "throughput ratio, snapshot lending the copier a core (>= 0.90)",
        "hook_yield": "throughput ratio, hook lending the copier a core (>= 0.90)",
    }
    for mode in ("snapshot", "hook", "snapshot_yield", "hook_yield", "snapshot_shm", "bare_copy"):
        if f"{mode}_throughput_ratio" in summary:
            targets.append([labels.get(mode, f"throughput ratio, {mode} (>= 0.90)"), f"{summary[f'{mode}_throughput_ratio']:.3f}"])
    if "blocked_ratio_vs_dcp" in summary:
        targets.append(["blocked vs DCP async_save (<= 0.10)", f"{summary['blocked_ratio_vs_dcp']:.3f}"])
    if "hook_blocked_ratio_vs_dcp" in summary:
        targets.append(["blocked vs DCP async_save, hook (<= 0.10)", f"{summary['hook_blocked_ratio_vs_dcp']:.3f}"])
    if "copy_bw_ratio" in summary:
        targets.append(["copy + checksum bandwidth vs plain copy (>= 0.70)", f"{summary['copy_bw_ratio']:.3f} ({summary['copy_gbps']:.2f} vs {summary['plain_copy_gbps']:.2f} GB/s)"])
        targets.append(["the same into /dev/shm segments, as the agent's (>= 0.70)", f"{summary['copy_bw_ratio_shm']:.3f} ({summary['copy_gbps_shm']:.2f} GB/s)"])
        targets.append(["copy + checksum bandwidth while training runs, GB/s", f"{summary['copy_gbps_during_training']:.2f}"])
        targets.append([f"checksum ({SnapshotPolicy().checksum}) bandwidth, GB/s", f"{summary['checksum_gbps']:.2f}"])
    print(markdown_table(["target", "measured"], targets, right=[False, True]))

    sweep: list[dict[str, Any]] = []
    if args.sweep:
        curve_modes = [m for m in ("none", "bare_copy", "snapshot", "snapshot_yield", "hook", "hook_yield") if m in args.modes.split(",") or m == "none"]
        for want in (float(v) for v in args.sweep.split(",")):
            b = calibrate(model, opt, want, copy_s)
            res = measure(model, opt, b, curve_modes, args)
            base = res["none"]["steps_per_s"]
            point = {"step_over_copy": (1 / base) / copy_s, "batch": b, "step_s": 1 / base}
            point.update({f"{m}_ratio": res[m]["steps_per_s"] / base for m in curve_modes if m != "none"})
            point["runs"] = {m: res[m]["all_steps_per_s"] for m in curve_modes}
            sweep.append(point)
        print("\nthroughput vs no checkpointing, by step time / plain copy time:\n")
        heads = ["step / copy", "step ms"] + [m for m in curve_modes if m != "none"]
        rows = [[f"{p['step_over_copy']:.1f}", f"{p['step_s'] * 1e3:.0f}"] + [f"{p[m + '_ratio']:.3f}" for m in curve_modes if m != "none"] for p in sweep]
        print(markdown_table(heads, rows, right=[True] * len(heads)))
    record = {"benchmark": "snapshot", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "results": results, "sweep": sweep}
    write_json(args.json, record)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
