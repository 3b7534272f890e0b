"""Streaming conversion and comparison between checkpoint formats (``ckpt convert``/``ckpt diff``).

``convert`` moves one tensor at a time from a reader to a writer (``ckpt.formats``): a small
thread pool reads ahead while the calling thread writes, in the order the writer declared.
Memory is bounded by a byte budget: a read starts only while the tensors held (being read,
waiting, being written, and their ``dtype`` casts) stay within twice the largest one, so peak
memory is about ``2 x largest tensor`` plus fixed overhead, never the checkpoint size (except
for the ``torch`` output, which ``torch.save`` can only write whole). The destination is
committed atomically at the end; any failure aborts the writer, which removes what it wrote.

``diff`` reads two checkpoints of any formats tensor by tensor (same budget) and reports each
tensor as equal (bit for bit), different (with the largest absolute difference), mismatched in
dtype or shape, or missing on one side.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from ckpt.formats import Reader, TensorInfo, Writer, guess_output_format, open_reader, open_writer

__all__ = ["convert", "ConvertReport", "diff", "DiffReport", "TensorDiff", "Progress", "FLOAT_DTYPES"]

log = logging.getLogger(__name__)

#: ``progress(done_bytes, total_bytes, tensor_name)`` after each tensor.
Progress = Callable[[int, int, str], None]
#: dtypes ``dtype=`` casts; integers, bools and complex tensors are kept as they are.
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` did (or, with ``dry_run``, would do).

    Attributes:
        src, dst: the locations; src_format, dst_format: the formats.
        tensors: tensors converted; bytes_in / bytes_out: their total size before / after casts.
        largest_tensor_bytes: the largest tensor (the memory bound is about twice this).
        plain_keys: non-tensor values carried over.
        seconds: wall time; committed: where the output was committed (None for dry runs).
        dry_run: nothing was written.
        plan: what the writer produces (files, shards, step...).
        warnings: things skipped or refused (never silently).
    """

    src: str
    dst: str
    src_format: str
    dst_format: str
    tensors: int
    bytes_in: int
    bytes_out: int
    largest_tensor_bytes: int
    plain_keys: tuple[str, ...]
    seconds: float
    committed: Optional[str]
    dry_run: bool
    plan: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["plain_keys"] = list(self.plain_keys)
        out["warnings"] = list(self.warnings)
        out["plan"] = dict(self.plan)
        out["throughput_bytes_per_s"] = round(self.bytes_in / self.seconds) if self.seconds > 0 and not self.dry_run else None
        return out


def _opts(url: str, storage_options: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """fsspec options apply to fsspec URLs only."""
    local = "://" not in str(url) or str(url).lower().startswith("file://")
    return None if local else storage_options


def _cast_dtype(info: TensorInfo, dtype: Optional[str]) -> str:
    return dtype if dtype and info.dtype in FLOAT_DTYPES else info.dtype


class _Budget:
    """Bytes held by tensors in flight; a read waits until it fits (one always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def fits(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.limit

    def take(self, n: int) -> None:
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


def _stream(reader: Reader, names: Sequence[str], costs: Mapping[str, int], load: Callable[[str], Any], threads: int) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, loaded)`` in order; reads run ahead on ``threads`` within the budget."""
    budget = _Budget(2 * max(costs.values(), default=0))
    pending: deque[tuple[str, Future]] = deque()
    todo = deque(names)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-convert-read") as pool:
        try:
            while todo or pending:
                while todo and len(pending) < threads + 1 and budget.fits(costs[todo[0]]):
                    name = todo.popleft()
                    budget.take(costs[name])
                    pending.append((name, pool.submit(load, name)))
                name, fut = pending.popleft()
                value = fut.result()
                del fut  # the future holds the result too: drop both before reading more
                yield name, value
                del value
                budget.give(costs[name])
        finally:
            for _, fut in pending:
                fut.cancel()


def convert(
    src: Any,
    dst: Any,
    *,
    src_format: Optional[str] = None,
    dst_format: Optional[str] = None,
    dtype: Optional[str] = None,
    dry_run: bool = False,
    layout: Any = None,
    rules: Any = None,
    step: Optional[int] = None,
    src_step: Optional[int] = None,
    max_shard_size: Optional[int] = None,
    storage_options: Optional[dict[str, Any]] = None,
    progress: Optional[Progress] = None,
    io_threads: int = 2,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` into a new checkpoint at ``dst``, streaming.

    Args:
        src: a path or fsspec URL of any format (``ckpt.formats.FORMATS``).
        dst: where to write; must not hold a checkpoint already (a universal root may, as long
            as the step is new).
        src_format, dst_format: formats; detected from ``src`` and guessed from ``dst``'s name
            (``.safetensors``, ``.pt``, ``.index.json``, an existing ckpt root) when None.
        dtype: cast floating-point tensors to this dtype (``bfloat16``, ``float16``...).
        dry_run: read metadata, plan, write nothing.
        layout: universal output only: a ``ckpt.layout.Layout`` (or ``"tp=2,pp=2,dp=2"``);
            each stored chunk is then exactly a region one rank of that layout holds under
            ``rules``, so every rank reads whole chunks and nothing else.
        rules: the sharding rules for ``layout`` (a ``Rules``, a shipped name or a file path).
        step: universal output: the step to write (default: the source's, else 0).
        src_step: universal input: the step to read (default the latest).
        max_shard_size: hf output: bytes per shard (default 5 GB).
        storage_options: fsspec options for whichever of ``src``/``dst`` is an fsspec URL.
        progress: called after each tensor with (done bytes, total bytes, name).
        io_threads: parallel reads ahead of the writer.

    Raises:
        UnknownFormatError, FormatError, UnsafeInputError, DestinationExistsError,
        CheckpointNotFoundError, StoreError: nothing was committed.
    """
    started = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype; use one of {FLOAT_DTYPES}")
    dst_format = dst_format or guess_output_format(dst, storage_options=_opts(dst, storage_options))
    if (layout is not None or rules is not None) and dst_format != "universal":
        raise ValueError(f"layout/rules shape universal output only, not {dst_format}")
    reader = open_reader(src, format=src_format, storage_options=_opts(src, storage_options), step=src_step)
    try:
        infos = reader.tensors()
        out_infos = [TensorInfo(i.name, _cast_dtype(i, dtype), i.shape) for i in infos]
        plain = reader.plain_state()
        warnings = list(reader.warnings())
        writer = _make_writer(dst, dst_format, out_infos, layout, rules, step, max_shard_size, _opts(dst, storage_options), io_threads, warnings)
        writer.set_plain_state(plain, origin=reader.origin())
        committed, plan = None, {}
        if dry_run:
            Writer.begin(writer, out_infos)  # validation only: no I/O
            plan = writer.plan()
        else:
            committed, plan = _run(reader, writer, infos, out_infos, io_threads, progress)
        return ConvertReport(
            src=reader.url, dst=writer.url, src_format=reader.format, dst_format=writer.format, tensors=len(infos),
            bytes_in=sum(i.nbytes for i in infos), bytes_out=sum(i.nbytes for i in out_infos),
            largest_tensor_bytes=max((i.nbytes for i in infos), default=0), plain_keys=tuple(plain),
            seconds=time.perf_counter() - started, committed=committed, dry_run=dry_run, plan=plan, warnings=tuple(warnings),
        )
    finally:
        reader.close()


def _make_writer(dst: str, fmt: str, infos: list[TensorInfo], layout: Any, rules: Any, step: Optional[int], max_shard_size: Optional[int],
                 opts: Optional[dict[str, Any]], io_threads: int, warnings: list[str]) -> Writer:
    if fmt == "universal":
        options: dict[str, Any] = {"step": step, "io_threads": max(2, io_threads)}
        if layout is not None or rules is not None:
            from ckpt.formats._layout import layout_regions

            planner = layout_regions(layout, rules, infos, warnings)
            options.update(regions=planner.regions, layout_record=planner.record, world_size=planner.world_size)
        return open_writer(dst, format=fmt, storage_options=opts, **options)
    if step is not None:
        raise ValueError(f"step applies to universal output only, not {fmt}")
    return open_writer(dst, format=fmt, storage_options=opts, max_shard_size=max_shard_size)


def _run(reader: Reader, writer: Writer, infos: list[TensorInfo], out_infos: list[TensorInfo], threads: int,
         progress: Optional[Progress]) -> tuple[str, dict[str, Any]]:
    from ckpt._tensors import torch_dtype

    cast = {o.name: o.dtype for i, o in zip(infos, out_infos) if o.dtype != i.dtype}
    costs = {i.name: i.nbytes + (o.nbytes if o.name in cast else 0) for i, o in zip(infos, out_infos)}

    def load(name: str) -> Any:
        t = reader.read(name)
        return t.to(torch_dtype(cast[name])) if name in cast else t

    total, done = sum(i.nbytes for i in infos), 0
    sizes = {i.name: i.nbytes for i in infos}
    try:
        writer.begin(out_infos)
        plan = writer.plan()
        for name, tensor in _stream(reader, [o.name for o in out_infos], costs, load, threads):
            writer.write(name, tensor)
            del tensor
            done += sizes[name]
            if progress is not None:
                progress(done, total, name)
        return writer.commit(), plan
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDiff:
    """One tensor compared. ``status``: equal | different | mismatch | only_a | only_b."""

    name: str
    status: str
    max_abs_diff: Optional[float] = None
    differing: Optional[int] = None
    detail: str = ""


@dataclass(frozen=True)
class DiffReport:
    a: str
    b: str
    a_format: str
    b_format: str
    tensors: tuple[TensorDiff, ...]
    plain: tuple[tuple[str, str], ...]  # (key, "only_a" | "only_b" | "different")

    @property
    def equal(self) -> bool:
        return all(t.status == "equal" for t in self.tensors) and not self.plain

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "a_format": self.a_format, "b_format": self.b_format, "equal": self.equal,
            "tensors": [t.__dict__ for t in self.tensors], "plain": [{"key": k, "status": s} for k, s in self.plain],
        }


_SLICE = 8 * 1024 * 1024  # elements compared at a time (bounds the float64 temporaries)


def compare_tensors(a: Any, b: Any) -> tuple[bool, Optional[float], int]:
    """(bit-exact equal, max |a - b| (None for bools), number of differing elements)."""
    import numpy as np
    import torch

    from ckpt._tensors import byte_view, host_contiguous

    a, b = host_contiguous(a).reshape(-1), host_contiguous(b).reshape(-1)
    va, vb = byte_view(a), byte_view(b)
    step = _SLICE * 8
    if all(np.array_equal(va[lo : lo + step], vb[lo : lo + step]) for lo in range(0, va.size, step)):
        return True, 0.0, 0
    worst: Optional[float] = None if a.dtype == torch.bool else 0.0
    count = 0
    for lo in range(0, a.numel(), _SLICE):
        x, y = a[lo : lo + _SLICE], b[lo : lo + _SLICE]
        if a.dtype == torch.bool:
            count += int((x != y).sum())
            continue
        wide = torch.complex128 if x.is_complex() else (torch.float64 if x.is_floating_point() else torch.int64)
        xw, yw = x.to(wide), y.to(wide)
        d = (xw - yw).abs()
        nan_x, nan_y = torch.isnan(xw), torch.isnan(yw)
        neq = (xw != yw) & ~(nan_x & nan_y)
        count += int(neq.sum())
        d = torch.where(nan_x ^ nan_y, torch.full_like(d, math.inf), torch.nan_to_num(d, nan=0.0))
        if d.numel():
            worst = max(worst or 0.0, float(d.max()))
    return False, worst, count


def diff(a: Any, b: Any, *, a_format: Optional[str] = None, b_format: Optional[str] = None,
         storage_options: Optional[dict[str, Any]] = None, io_threads: int = 2, progress: Optional[Progress] = None) -> DiffReport:
    """Compare two checkpoints of any formats tensor by tensor (see the module docstring)."""
    ra = open_reader(a, format=a_format, storage_options=_opts(str(a), storage_options))
    try:
        rb = open_reader(b, format=b_format, storage_options=_opts(str(b), storage_options))
        try:
            return _diff(ra, rb, io_threads, progress)
        finally:
            rb.close()
    finally:
        ra.close()


def _diff(ra: Reader, rb: Reader, threads: int, progress: Optional[Progress]) -> DiffReport:
    ia, ib = {i.name: i for i in ra.tensors()}, {i.name: i for i in rb.tensors()}
    out: list[TensorDiff] = [TensorDiff(n, "only_a") for n in ia if n not in ib] + [TensorDiff(n, "only_b") for n in ib if n not in ia]
    both = []
    for n in ia:
        if n not in ib:
            continue
        if ia[n].dtype != ib[n].dtype or ia[n].shape != ib[n].shape:
            out.append(TensorDiff(n, "mismatch", detail=f"{ia[n].dtype} {list(ia[n].shape)} vs {ib[n].dtype} {list(ib[n].shape)}"))
        else:
            both.append(n)
    costs = {n: 2 * ia[n].nbytes for n in both}
    total, done = sum(costs.values()), 0
    for name, (x, y) in _stream(ra, both, costs, lambda n: (ra.read(n), rb.read(n)), threads):
        equal, worst, count = compare_tensors(x, y)
        out.append(TensorDiff(name, "equal" if equal else "different", worst, count))
        done += costs[name]
        if progress is not None:
            progress(done, total, name)
    pa, pb = ra.plain_state(), rb.plain_state()
    plain = [(k, "only_a") for k in pa if k not in pb] + [(k, "only_b") for k in pb if k not in pa]
    plain += [(k, "different") for k in pa if k in pb and pa[k] != pb[k] and not _both_nan(pa[k], pb[k])]
    order = {n: i for i, n in enumerate(list(ia) + [n for n in ib if n not in ia])}
    return DiffReport(ra.url, rb.url, ra.format, rb.format, tuple(sorted(out, key=lambda t: order[t.name])), tuple(plain))


def _both_nan(x: Any, y: Any) -> bool:
    return isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)

