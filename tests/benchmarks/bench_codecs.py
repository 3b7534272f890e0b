"""Throughput of checksums, byteshuffle and zstd on checkpoint-like buffers (one thread).

Usage::

    python tests/benchmarks/bench_codecs.py [--json bench-results/codecs.json] [--size-mib 256]

Every figure is the median of ``--runs`` runs over a ``--size-mib`` buffer; GB/s counts the
*uncompressed* bytes (1 GB = 1e9 bytes). The baseline is a numpy memory copy of the same
buffer into a preallocated array, and each row states its speed as a fraction of that copy.
Codecs allocate their output, as ``save``/``load`` do, so they also pay for first-touching
fresh pages; the "fresh output" copy row shows that cost on its own. Data:

* ``fp32``: ``randn * 0.02`` as float32, a stand-in for trained weights;
* ``bf16``: the top 16 bits of such float32 values (bfloat16 by truncation).

Prints a table and writes a JSON record with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import zstandard

from ckpt.codecs import ByteShuffle, CodecChain, Zstd, checksum

DEFAULT_JSON = Path("bench-results/codecs.json")
_T = TypeVar("_T")


def _median_seconds(fn: Callable[[], _T], runs: int) -> tuple[float, _T]:
    """Runs ``fn`` ``runs`` (>= 1) times; returns the median wall time and the last result."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "zstd_library": ".".join(map(str, zstandard.ZSTD_VERSION)),
    }


def _make_data(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    fp32 = rng.standard_normal(size // 4, dtype=np.float32) * np.float32(0.02)
    bf16_source = rng.standard_normal(size // 2, dtype=np.float32) * np.float32(0.02)
    bf16 = (bf16_source.view(np.uint32) >> 16).astype(np.uint16)
    return {"fp32": fp32, "bf16": bf16}


def run(size: int, runs: int) -> dict[str, Any]:
    """Runs every measurement and returns the JSON record."""
    data = _make_data(size)
    rows: list[dict[str, Any]] = []

    def add(name: str, dtype: str, seconds: float, ratio: float | None = None) -> None:
        rows.append({"name": name, "dtype": dtype, "gbps": size / seconds / 1e9, "ratio": ratio})

    fp32 = data["fp32"]
    dst = np.empty_like(fp32)
    seconds, _ = _median_seconds(lambda: np.copyto(dst, fp32), runs)
    add("numpy copy (baseline)", "fp32", seconds)
    del dst
    seconds, _ = _median_seconds(lambda: fp32.copy(), runs)
    add("numpy copy, fresh output", "fp32", seconds)
    for algorithm in ("crc32c", "xxh3_64"):
        seconds, _ = _median_seconds(lambda a=algorithm: checksum(a, fp32), runs)
        add(f"checksum {algorithm}", "fp32", seconds)
    for dtype, array in data.items():
        shuffle = ByteShuffle(array.itemsize)
        seconds, shuffled = _median_seconds(lambda s=shuffle, a=array: s.encode(a), runs)
        add("byteshuffle encode", dtype, seconds)
        seconds, _ = _median_seconds(
            lambda s=shuffle, b=shuffled: s.decode(b, decoded_size=size), runs
        )
        add("byteshuffle decode", dtype, seconds)
        del shuffled
    for level in (1, 3):
        for dtype, array in data.items():
            for shuffled in (False, True):
                codecs = (ByteShuffle(array.itemsize),) if shuffled else ()
                chain = CodecChain((*codecs, Zstd(level=level)))
                label = f"zstd-{level}{' +shuffle' if shuffled else ''}"
                seconds, stored = _median_seconds(lambda c=chain, a=array: c.encode(a), runs)
                ratio = size / len(stored)
                add(f"{label} compress", dtype, seconds, ratio)
                seconds, out = _median_seconds(
                    lambda c=chain, s=stored: c.decode(s, size), runs
                )
                if not np.array_equal(np.frombuffer(out, np.uint8), array.view(np.uint8)):
                    raise RuntimeError(f"{label} on {dtype} did not round-trip")
                add(f"{label} decompress", dtype, seconds, ratio)
                del stored, out
    baseline = rows[0]["gbps"]
    for row in rows:
        row["vs_copy"] = row["gbps"] / baseline
    return {
        "benchmark": "codecs",
        "machine": _machine(),
        "buffer_bytes": size,
        "runs": runs,
        "statistic": "median",
        "threads": 1,
        "baseline": {"name": "numpy copy", "gbps": baseline},
        "results": rows,
    }


def format_table(record: dict[str, Any]) -> str:
    """Renders the record as a Markdown table."""
    machine = record["machine"]
    lines = [
        f"codecs, {record['buffer_bytes'] >> 20} MiB buffers, median of {record['runs']}, "
        f"1 thread, {machine['cpu']} ({machine['cores']} cores), zstd {machine['zstd_library']}",
        "",
        "| operation | data | GB/s | vs copy | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for row in record["results"]:
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else ""
        lines.append(
            f"| {row['name']} | {row['dtype']} | {row['gbps']:.2f} | {row['vs_copy']:.3f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="JSON output path")
    parser.add_argument("--size-mib", type=int, default=256, help="buffer size in MiB")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.size_mib < 1:
        parser.error("--runs and --size-mib must be at least 1")
    record = run(args.size_mib << 20, args.runs)
    sys.stdout.write(format_table(record) + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
