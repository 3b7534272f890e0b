"""The in-process lazy snapshot engine: record references now, copy in the background.

``snapshot(step)`` flattens the state (model, optimizer, nested dicts, plain values), captures
the plain values and the list of tensors, and returns; a copier thread then copies each tensor
into a reused, pre-faulted slot of a ``SnapshotBuffers`` and checksums it. Two slots: one holds
the latest complete snapshot while the other is filled (DataStates-LLM's lazy copy, PRIOR_ART
§1.2). Tensors are immutable during forward and backward, so training only has to wait before
something mutates them: ``register_guard(optimizer)`` installs a step pre-hook that waits, in the
copier's order, for the completion of exactly the tensors that optimizer will write and that
are still being copied (and returns at once when none are).

Errors in the copier are latched (STYLE rules 8 and 10): the training step never sees an
exception from the thread; the error surfaces exactly once, at the next ``wait()`` (raised) or
``snapshot()`` (logged, or raised once ``max_failures`` consecutive snapshots failed).

On CUDA, a tensor on the device is copied on a side stream that first waits for an event
recorded on the compute stream at ``snapshot()``, into pinned slots (``PinnedBuffers``); a guard
makes the compute stream wait for the copy's event instead of blocking the host.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ckpt._state import flatten
from ckpt._tensors import byte_view, host_contiguous
from ckpt.codecs import Hasher, checksum
from ckpt.snapshot._buffers import InProcessBuffers, SnapshotBuffers
from ckpt.snapshot._records import Entry, Flag, Job, Slot, Snapshot, SnapshotFailedError, SnapshotPolicy, storage_key
from ckpt.snapshot._yield import CoreYield

__all__ = ["SnapshotPolicy", "SnapshotEngine", "Snapshot", "SnapshotFailedError", "CopyFn"]

log = logging.getLogger("ckpt.snapshot")

#: ``copy_fn(dst, src)``: copy the ``uint8`` array ``src`` into ``dst`` (same size).
CopyFn = Callable[[np.ndarray, np.ndarray], None]

_BLOCK = 1 << 18  # host copies go block by block: each block checksummed, then copied from cache
_ALIGN = 64  # every tensor starts on a 64-byte boundary of its slot (any dtype view fits)


class SnapshotEngine:
    """Lazy, double-buffered snapshots of ``state`` into reused host buffers.

    Args:
        state: anything ``ckpt`` can flatten (modules, optimizers, schedulers, nested dicts,
            tensors, plain values); flattened again at every ``snapshot()``, so plain values
            and objects' ``state_dict()`` are captured at that step.
        buffers: where the slots live (default ``InProcessBuffers``; ``PinnedBuffers`` on CUDA).
        policy: back-pressure and failure policy.
        copy_fn: copies one tensor's bytes (``numpy.copyto`` by default; tests slow it down).
        slots: number of slots (2: double buffering).
        on_complete: called with each snapshot once it is complete, pinned, in step order, on a
            publisher thread of its own (so a slow callee, e.g. one waiting on the agent, never
            holds up the next copy, which the optimizer's guard may wait for); the callee owns
            that pin and must ``release()`` it (it may keep it, e.g. to publish it; the slot is
            not reused while pinned). Exceptions from it are logged, never raised into training.

    ``start()`` starts the copier thread (and the publisher with ``on_complete``); ``close()``
    is mandatory (or use ``with``).
    """

    def __init__(
        self,
        state: Any,
        *,
        buffers: Optional[SnapshotBuffers] = None,
        policy: Optional[SnapshotPolicy] = None,
        copy_fn: Optional[CopyFn] = None,
        slots: int = 2,
        on_complete: Optional[Callable[[Snapshot], None]] = None,
    ) -> None:
        if slots < 2:
            raise ValueError(f"slots must be >= 2 (one complete, one being filled), not {slots}")
        self._state = state
        self._buffers = buffers if buffers is not None else InProcessBuffers()
        self.policy = policy if policy is not None else SnapshotPolicy()
        self._copy_fn: CopyFn = copy_fn if copy_fn is not None else np.copyto
        self._slots = [Slot(i) for i in range(slots)]
        self._cond = threading.Condition()
        self._flags = threading.Condition()  # the tensors' done/issued flags (see Flag)
        self._queue: collections.deque[Job] = collections.deque()
        self._inflight: list[Job] = []  # queued or being copied
        self._publishing: collections.deque[tuple[Job, Snapshot]] = collections.deque()  # copied, on_complete pending
        self._copier_done = False
        self._publisher: Optional[threading.Thread] = None
        self._latest: Optional[Slot] = None
        self._error: Optional[BaseException] = None
        self._failures = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._closed = False
        self._hooks: list[Any] = []
        self._side_stream: Any = None
        self._on_complete = on_complete
        self._yield = CoreYield(self.policy.yield_threads)
        self._host_pending = 0  # queued or running jobs whose host copies are not done
        #: counters: taken, skipped, completed, failed, yielded (times threads were lent to
        #: the copier), blocked_s (guards and wait_for),
        #: snapshot_s (time spent inside snapshot()), wait_s (inside wait()), and on the copier:
        #: copy_s, copied_bytes (host-to-host copies), checksum_s
        self.stats: dict[str, float] = dict(
            taken=0, skipped=0, completed=0, failed=0, yielded=0, blocked_s=0.0, snapshot_s=0.0, wait_s=0.0, copy_s=0.0, copied_bytes=0, checksum_s=0.0
        )

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> SnapshotEngine:
        """Start the copier thread (once)."""
        if self._closed:
            raise RuntimeError("SnapshotEngine is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ckpt-snapshot-copier", daemon=True)
            self._thread.start()
            if self._on_complete is not None:
                self._publisher = threading.Thread(target=self._publish_loop, name="ckpt-snapshot-publisher", daemon=True)
                self._publisher.start()
        return self

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish the copies in flight, join the copier, remove guards, free the buffers.
        Idempotent. A latched error not yet surfaced is logged."""
        if self._closed:
            return
        for flag, thread in (("_stop", self._thread), ("_copier_done", self._publisher)):
            with self._cond:  # the copier drains its queue, then the publisher its own
                setattr(self, flag, True)
                self._cond.notify_all()
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    raise TimeoutError(f"snapshot thread {thread.name} did not finish within {timeout} s")
        self._closed = True
        self._yield.restore()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        with self._cond:
            self._latest = None
            if self._error is not None:
                log.warning("snapshot engine closed with an unreported copier error: %r", self._error)
                self._error = None
        self._buffers.close()

    def __enter__(self) -> SnapshotEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def memory_bytes(self) -> int:
        """Host bytes held by the snapshot slots now (bounded by ``slots`` x state size)."""
        return self._buffers.memory_bytes

    # ---------------------------------------------------------------- taking snapshots
    def snapshot(self, step: int) -> bool:
        """Record the state's tensors and plain values at ``step`` and return; the copy runs in
        the background. Returns False when back-pressure skipped it.

        Raises:
            SnapshotFailedError: ``policy.max_failures`` snapshots in a row failed.
            UnsupportedStateError: the state holds something that cannot be snapshotted.
        """
        t0 = time.perf_counter()
        try:
            return self._snapshot(step)
        finally:
            self.stats["snapshot_s"] += time.perf_counter() - t0

    def _snapshot(self, step: int) -> bool:
        if self._thread is None or self._closed:
            raise RuntimeError("SnapshotEngine is not started (call start() or use 'with') or is closed")
        self._surface_at_snapshot()
        flat = flatten(self._state)
        entries, offset, any_cuda = [], 0, False
        flags = self._flags
        for name, t in flat.tensors.items():  # (flatten checked the dtypes)
            if t.requires_grad:
                t = t.detach()
            nbytes = t.numel() * t.element_size()
            cuda = t.is_cuda
            any_cuda |= cuda
            entries.append(Entry(name, t, offset, nbytes, t.dtype, tuple(t.shape), storage_key(t), cuda, Flag(flags), Flag(flags)))
            offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        ready = None
        if any_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream())
        with self._cond:
            slot = self._free_slot()
            if slot is None and self.policy.backpressure == "wait":
                deadline = None if self.policy.wait_timeout_s is None else time.monotonic() + self.policy.wait_timeout_s
                while slot is None and not self._stop:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
                    slot = self._free_slot()
            if slot is None:
                self.stats["skipped"] += 1
                log.warning("snapshot of step %d skipped: every snapshot slot is busy (copying, or pinned until published or persisted; policy %s)", step, self.policy.backpressure)
                return False
            job = Job(step, slot, entries, offset, flat.tree, frozenset(flat.ndarrays), ready)
            job.host_pending = any(not e.cuda for e in entries)
            self._host_pending += job.host_pending
            slot.status, slot.job = "busy", job
            self._queue.append(job)
            self._inflight.append(job)
            self.stats["taken"] += 1
            self._cond.notify_all()
        if job.host_pending:
            self._yield.lower()  # the copier takes a core from this thread until it is done
            self.stats["yielded"] = self._yield.lowered_count
        return True

    def _host_done(self, job: Job) -> None:
        """The copier finished ``job``'s host copies (or gave up on them)."""
        with self._cond:
            if job.host_pending:
                job.host_pending = False
                self._host_pending -= 1

    def _free_slot(self) -> Optional[Slot]:
        return next((s for s in self._slots if s.status == "free"), None)

    def _surface_at_snapshot(self) -> None:
        with self._cond:
            err, self._error = self._error, None
            failures = self._failures
        if err is None:
            return
        if failures >= self.policy.max_failures:
            raise SnapshotFailedError(f"{failures} snapshots in a row failed; the last with {err!r}") from err
        log.error("snapshot failed (%d in a row, raising at %d): %r", failures, self.policy.max_failures, err)

    # ---------------------------------------------------------------- waiting
    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until every snapshot in flight is copied and checksummed (and handed to
        ``on_complete``, if any); re-raise a latched copier error (once).

        Raises:
            TimeoutError: still copying after ``timeout`` seconds.
        """
        t0 = time.perf_counter()
        try:
            with self._cond:
                jobs = list(self._inflight) + [j for j, _ in self._publishing]
            deadline = None if timeout is None else time.monotonic() + timeout
            for job in jobs:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not job.finished.wait(left):
                    raise TimeoutError(f"snapshot of step {job.step} still copying after {timeout} s")
            self._yield.restore_if(self._host_pending)
            with self._cond:
                err, self._error = self._error, None
            if err is not None:
                raise err
        finally:
            self.stats["wait_s"] += time.perf_counter() - t0

    def wait_for(self, *tensors: torch.Tensor, timeout: Optional[float] = None) -> None:
        """Block until no snapshot in flight still has to read ``tensors`` (or anything sharing
        their storage), so they may be written. Returns at once when none does. For CUDA tensors
        the current stream is made to wait for the copy instead of the host."""
        self._wait_keys({storage_key(t) for t in tensors}, timeout)

    def _wait_keys(self, keys: set[int], timeout: Optional[float]) -> None:
        with self._cond:
            jobs = list(self._inflight)
        if not jobs:
            return
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for job in jobs:  # in the copier's order
                for e in job.entries:
                    if e.key not in keys or e.done.is_set():
                        continue
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if e.cuda:
                        if not e.issued.wait(left):
                            raise TimeoutError(f"copy of {e.name!r} (step {job.step}) not issued after {timeout} s")
                        if e.cuda_event is not None:
                            torch.cuda.current_stream().wait_event(e.cuda_event)
                    elif not e.done.wait(left):
                        raise TimeoutError(f"copy of {e.name!r} (step {job.step}) not done after {timeout} s")
        finally:
            self.stats["blocked_s"] += time.perf_counter() - t0

    def register_guard(self, obj: Any) -> Any:
        """Protect what ``obj`` mutates from snapshots still being copied.

        An optimizer gets a step pre-hook waiting for its parameters and state tensors; a module
        gets a forward pre-hook waiting for its buffers (e.g. BatchNorm running statistics that
        forward updates). Both give back the threads lent to the copier (``yield_threads``), as
        does each gradient accumulated into an optimizer's parameters once the copy is done.
        Returns the guard's hook handle (all are removed by ``close()``).
        """
        if isinstance(obj, torch.optim.Optimizer):

            def opt_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                if not self._inflight:  # nothing in flight: no cost beyond this test
                    self._yield.restore_if(self._host_pending)
                    return
                keys = {storage_key(p) for g in opt.param_groups for p in g["params"]}
                for st in opt.state.values():
                    keys.update(storage_key(v) for v in st.values() if isinstance(v, torch.Tensor))
                self._wait_keys(keys, None)
                self._yield.restore()  # this optimizer's copies are done; the step needs every core

            handle = obj.register_step_pre_hook(opt_hook)
            if self.policy.yield_threads != 0:  # the copy often ends during backward
                for p in {id(p): p for g in obj.param_groups for p in g["params"] if p.requires_grad}.values():
                    try:
                        self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p: self._yield.restore_if(self._host_pending)))
                    except RuntimeError as e:  # e.g. a non-leaf parameter: the step pre-hook restores
                        log.debug("no gradient hook on a parameter of %s: %r", type(obj).__name__, e)
        elif isinstance(obj, torch.nn.Module):

            def mod_hook(mod: torch.nn.Module, args: Any) -> None:
                if self._inflight:
                    self._wait_keys({storage_key(b) for b in mod.buffers()}, None)
                self._yield.restore_if(self._host_pending)

            handle = obj.register_forward_pre_hook(mod_hook)
        else:
            raise TypeError(f"register_guard takes a torch optimizer or module, not {type(obj).__name__}")
        self._hooks.append(handle)
        return handle

    # ---------------------------------------------------------------- reading
    def latest_complete(self) -> Optional[Snapshot]:
        """The newest snapshot whose tensors are all copied and checksummed, pinned in its slot
        until ``release()`` (a pinned slot is not reused: release it promptly); None if none."""
        with self._cond:
            slot = self._latest
            if slot is None or slot.job is None:
                return None
            slot.pins += 1
            job = slot.job
        return Snapshot(job, self.policy.checksum, lambda: self._unpin(slot))

    def _unpin(self, slot: Slot) -> None:
        with self._cond:
            slot.pins -= 1
            if slot.pins == 0 and slot.status == "stale":
                slot.status, slot.job = "free", None
                self._cond.notify_all()

    # ---------------------------------------------------------------- the copier
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
            handed = False  # to the publisher, which finishes the job
            try:
                self._copy(job)
            except BaseException as e:  # latched; the training thread decides at snapshot()/wait()
                self._host_done(job)
                for ent in job.entries:
                    ent.src = None
                    ent.issued.set()
                    ent.done.set()
                with self._cond:
                    self._error = e
                    self._failures += 1
                    self.stats["failed"] += 1
                    job.slot.status, job.slot.job = "free", None
                    self._inflight.remove(job)
                    self._cond.notify_all()
                log.debug("snapshot of step %d failed", job.step, exc_info=True)
            else:
                with self._cond:
                    old, self._latest = self._latest, job.slot
                    job.slot.status = "complete"
                    if old is not None:
                        if old.pins == 0:
                            old.status, old.job = "free", None
                        else:
                            old.status = "stale"
                    self._failures = 0
                    self.stats["completed"] += 1
                    self._inflight.remove(job)
                    if self._on_complete is not None:
                        # published by its own thread: a slow or hung consumer (the agent) must
                        # not hold up the next copy, which the optimizer's guard may wait for
                        job.slot.pins += 1
                        pinned = Snapshot(job, self.policy.checksum, lambda slot=job.slot: self._unpin(slot))
                        self._publishing.append((job, pinned))
                        handed = True
                    self._cond.notify_all()
            finally:
                if not handed:
                    job.finished.set()

    def _publish_loop(self) -> None:
        """Hand each completed snapshot to ``on_complete``, in order; the job is finished (for
        ``wait()``) once it returns."""
        while True:
            with self._cond:
                while not self._publishing and not (self._stop and self._copier_done):
                    self._cond.wait()
                if not self._publishing:
                    return
                job, pinned = self._publishing[0]
            try:
                self._on_complete(pinned)  # type: ignore[misc]
            except Exception:
                log.exception("on_complete callback failed for the snapshot of step %d", job.step)
                pinned.release()
            finally:
                with self._cond:
                    self._publishing.popleft()
                    self._cond.notify_all()
                job.finished.set()

    def _copy(self, job: Job) -> None:
        buf = self._buffers.allocate(job.slot.index, job.total)
        job.buffer = buf
        cuda_entries = [e for e in job.entries if e.cuda]
        if cuda_entries:
            self._issue_cuda(job, cuda_entries)
        algo = self.policy.checksum
        copy_s = hash_s = 0.0
        for e in job.entries:
            if e.cuda:
                continue
            src = e.src
            assert src is not None
            if src.device.type == "cpu" and src.is_contiguous() and not src.is_conj() and not src.is_neg():
                data = byte_view(src)
            else:  # a non-contiguous view (or a conj/neg view): gathered by value first
                data = byte_view(host_contiguous(src))
            dst = buf[e.offset : e.offset + e.nbytes]
            hasher = Hasher(algo)
            # block by block (a quarter of a core's L2): the checksum reads the block from
            # memory, the copy then reads it from the cache, so the source is read from memory
            # once (measured: as cheap as the bare copy; checksumming the slot after the copy was
            # not). The guard keeps the source still until its entry is done.
            for lo in range(0, e.nbytes, _BLOCK):
                t0 = time.perf_counter()
                hasher.update(data[lo : lo + _BLOCK])
                t1 = time.perf_counter()
                self._copy_fn(dst[lo : lo + _BLOCK], data[lo : lo + _BLOCK])
                copy_s += time.perf_counter() - t1
                hash_s += t1 - t0
            e.src = None
            e.done.set()
            job.checksums[e.name] = hasher.hexdigest()
        self._host_done(job)
        for e in cuda_entries:
            e.cuda_event.synchronize()
            e.src = None
            e.done.set()
            t1 = time.perf_counter()
            job.checksums[e.name] = checksum(algo, buf[e.offset : e.offset + e.nbytes])
            hash_s += time.perf_counter() - t1
        self.stats["copy_s"] += copy_s
        self.stats["copied_bytes"] += sum(e.nbytes for e in job.entries if not e.cuda)
        self.stats["checksum_s"] += hash_s

    def _issue_cuda(self, job: Job, entries: Iterable[Entry]) -> None:
        """Enqueue the device-to-host copies on the side stream, after the compute stream's
        ``ready_event``; each gets its own event that guards make the compute stream wait on."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        whole = self._buffers.as_tensor(job.slot.index)
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_event(job.ready_event)
            for e in entries:
                src = e.src
                assert src is not None
                src.record_stream(self._side_stream)  # the allocator must not reuse it mid-copy
                if e.nbytes:
                    dst = whole[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
                    dst.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._side_stream)
                e.cuda_event = ev
                e.issued.set()
