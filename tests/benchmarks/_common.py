"""Helpers shared by the benchmark scripts: timing, medians, machine record, tables, JSON.

The benchmarks are scripts, not tests: each one measures, prints a Markdown table and writes a
JSON record. This module holds what every one of them needs, so that records from different
benchmarks describe the machine the same way. It imports only the standard library (and
torch/numpy lazily, for their versions).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

__all__ = [
    "timed",
    "median",
    "gbps",
    "machine",
    "filesystem_of",
    "free_bytes",
    "drop_page_cache",
    "proc_io",
    "markdown_table",
    "write_json",
]

T = TypeVar("T")


def timed(fn: Callable[[], T], *, collect: bool = True) -> tuple[float, T]:
    """Runs ``fn`` once and returns ``(seconds, result)``, timed with ``perf_counter``.

    Args:
        fn: the work to time.
        collect: run the garbage collector first, so that a collection left over from earlier
            work does not land inside the timed region.
    """
    if collect:
        gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (which must not be empty)."""
    return float(statistics.median(values))


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (1 GB = 1e9 bytes)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict[str, Any]:
    """A description of the machine and software, for the JSON record."""
    record: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for module in ("numpy", "torch"):
        mod = sys.modules.get(module)
        if mod is not None:
            record[module] = getattr(mod, "__version__", "?")
    return record


def filesystem_of(path: str) -> dict[str, str]:
    """The mount point, device and file system type holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = {"mount": "?", "device": "?", "type": "?"}
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    best_len = -1
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        device, mount, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best_len:
            best, best_len = {"mount": mount, "device": device, "type": fstype}, len(mount)
    return best


def free_bytes(path: str) -> int:
    """Bytes available to this user on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def drop_page_cache() -> Optional[str]:
    """Writes back dirty pages and drops the clean page cache (needs root).

    Returns:
        None on success, else why it could not be done (the caller reports it and goes on).
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def proc_io() -> dict[str, int]:
    """This process's I/O counters from ``/proc/self/io`` (all its threads); empty if unreadable.

    ``rchar`` counts the bytes its ``read``/``pread`` calls returned, page cache hits included;
    ``read_bytes`` counts what was fetched from the block device (cache misses). Take the
    difference of two calls around the work to measure.
    """
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] = ()) -> str:
    """Renders a Markdown table; ``right[i]`` right-aligns column ``i`` (numbers)."""
    align = [("---:" if i < len(right) and right[i] else "---") for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` as indented JSON, creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
