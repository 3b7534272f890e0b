"""The saving process that ``test_crash_kill.py`` kills with SIGKILL.

The parent starts ``child_main(spec)`` in a forked process (a forkserver that has imported
torch once, so a kill point costs a fork, not a two-second ``import torch``). The child saves
a series of ``(step, attempt)`` into ``spec["root"]`` with content that is a pure function of
``(step, attempt)`` (see ``make_state``), and records what it does in an append-only journal of
JSON lines that survives the kill:

* ``{"ev": "begin", "step", "attempt"}`` before each ``ckpt.save``;
* ``{"ev": "done", "step", "attempt", "save_id"}`` after it returned;
* ``{"ev": "kill", "key", "phase", "written", "total"}`` just before an in-process kill;
* ``{"ev": "ready"}`` once the state's buffers are allocated, before the first save;
* ``{"ev": "finished", "data": N, "manifest": M}`` (puts made) when the plan ran to the end.

The ``"inproc"`` mode saves ``spec["plan"]``, a list of ``(step, attempt)``; its kill points
are deterministic: ``KillingStore`` (a ``LocalStore``) counts the puts of one kind (``"data"``
or ``"manifest"``) and arms the kill at the N-th. In phase ``"mid"`` the kill comes from
inside ``LocalStore.put`` after part of the bytes went into its temporary file (``_write_all``
is wrapped for this process); in phase ``"after"`` it comes right after the put returned,
before the library sees the return. The ``"loop"`` mode saves the steps of ``spec["cycle"]``
round and round, each save with a fresh attempt number, until the parent kills it on a timer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Iterable, Optional

import torch

import ckpt
from ckpt import _save
from ckpt.store import local as _local
from ckpt.store.local import LocalStore

#: A child never outlives this, even if its parent vanished without killing it.
MAX_CHILD_SECONDS = 300.0
#: Saves a ``"loop"`` child makes at most (attempt numbers ``attempt_base + 0 ..``).
LOOP_SAVES = 1000

_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------------------------
# Content: a pure function of (step, attempt), so the parent can check any save it finds.
# --------------------------------------------------------------------------------------------
def tensor_value(step: int, attempt: int, index: int, numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``int64`` values whose high half names (step, attempt, index) and low half the position.

    A chunk from another save, another tensor or another place in the tensor changes the value.
    With ``out``, the values are written into it (no allocation between two saves of a loop).
    """
    if not (0 <= attempt < 100_000 and 0 <= index < 64 and 0 <= step < 300):
        raise ValueError(f"content code out of range: step {step}, attempt {attempt}, index {index}")
    code = (step * 100_000 + attempt) * 64 + index  # < 2**31
    if out is None:
        out = torch.empty(numel, dtype=torch.int64)
    return torch.arange(numel, dtype=torch.int64, out=out).add_(code << 32)


def make_state(
    step: int, attempt: int, tensors: int, numel: int, reuse: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """The state a child saves as ``(step, attempt)``: tensors plus plain values.

    With ``reuse`` (an earlier result), its tensors are refilled in place.
    """
    model = reuse["model"] if reuse is not None else {}
    return {
        "model": {f"w{i:02d}": tensor_value(step, attempt, i, numel, model.get(f"w{i:02d}")) for i in range(tensors)},
        "meta": {"step": step, "attempt": attempt, "tag": f"step {step} attempt {attempt}"},
    }


def template(tensors: int, numel: int) -> dict[str, Any]:
    """A zero-filled state of the same structure, for ``ckpt.load`` to fill in place."""
    return {"model": {f"w{i:02d}": torch.zeros(numel, dtype=torch.int64) for i in range(tensors)}, "meta": None}


# --------------------------------------------------------------------------------------------
# Journal
# --------------------------------------------------------------------------------------------
class Journal:
    """Append-only JSON lines; each line is one ``write`` on an ``O_APPEND`` descriptor."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **event: Any) -> None:
        os.write(self._fd, (json.dumps(event, sort_keys=True) + "\n").encode())


def read_journal(path: str) -> list[dict[str, Any]]:
    """The journal's complete events (a missing journal is empty).

    A line without its newline is dropped: a SIGKILL from outside may cut a ``write`` short.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------------------------
# Kill injection
# --------------------------------------------------------------------------------------------
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)  # SIGKILL is delivered before this returns; never reached
    os._exit(99)


class KillingStore(LocalStore):
    """A ``LocalStore`` that SIGKILLs its own process at the N-th put of one kind.

    Args:
        root: the checkpoint directory.
        journal: where to record the kill.
        kind: count ``"data"`` puts (keys under ``data/``) or ``"manifest"`` puts.
        nth: 1-based index of the put to kill at; 0 never kills (puts are still counted).
        phase: ``"mid"`` (part of the bytes written to the temp file) or ``"after"`` (the put
            completed and is durable; the library never learns it returned).
        fraction: in phase ``"mid"``, the share of the object's bytes written before the kill.
    """

    def __init__(self, root: str, journal: Journal, *, kind: str = "data", nth: int = 0,
                 phase: str = "mid", fraction: float = 0.5) -> None:
        super().__init__(root)
        self._journal = journal
        self._kind, self._nth, self._phase, self._fraction = kind, nth, phase, fraction
        self._lock = threading.Lock()
        self.counts = {"data": 0, "manifest": 0}

    def put(self, key: str, data: Any) -> None:
        kind = "manifest" if key.startswith("manifests/") else "data"
        with self._lock:
            self.counts[kind] += 1
            armed = self._nth > 0 and kind == self._kind and self.counts[kind] == self._nth
        if not armed:
            super().put(key, data)
            return
        if self._phase == "after":
            super().put(key, data)
            self._journal.write(ev="kill", key=key, phase="after", written=-1, total=-1)
            _die()
        _ARMED.key = key
        _ARMED.fraction = self._fraction
        _ARMED.journal = self._journal
        super().put(key, data)  # _killing_write_all kills inside
        raise AssertionError("the armed put returned; the kill did not happen")


_ARMED = threading.local()
_real_write_all = _local._write_all


def _killing_write_all(fd: int, views: list[memoryview]) -> None:
    """``LocalStore``'s writer: when this thread's put is armed, write a prefix, then die."""
    key = getattr(_ARMED, "key", None)
    if key is None:
        _real_write_all(fd, views)
        return
    total = sum(v.nbytes for v in views)
    budget = int(total * _ARMED.fraction)
    written = 0
    for v in views:
        if written >= budget:
            break
        part = v[: budget - written]
        _real_write_all(fd, [part])
        written += part.nbytes
    _ARMED.journal.write(ev="kill", key=key, phase="mid", written=written, total=total)
    _die()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: get SIGKILL when the forkserver that made us exits (best effort elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _save_one(
    url: Any, journal: Journal, state: dict[str, Any], step: int, attempt: int, spec: dict[str, Any]
) -> dict[str, Any]:
    """Refill ``state`` as ``(step, attempt)`` and save it, journalling begin and done."""
    state = make_state(step, attempt, spec["tensors"], spec["numel"], reuse=state)
    journal.write(ev="begin", step=step, attempt=attempt)
    result = ckpt.save(
        state, url, step=step, compression=None, io_threads=spec["io_threads"],
        extras={"attempt": attempt, "tensors": spec["tensors"], "numel": spec["numel"]},
    )
    journal.write(ev="done", step=step, attempt=attempt, save_id=result.save_id)
    return state


def child_main(spec: dict[str, Any]) -> None:
    """Run one child; ``spec`` is a plain dict (see ``test_crash_kill.Root.spec``)."""
    _die_with_parent()
    torch.set_num_threads(1)  # the content is cheap; OpenMP spinning on a busy box is not
    deadline = time.monotonic() + MAX_CHILD_SECONDS
    _save.CHUNK_BYTES = spec["chunk_bytes"]
    _save.MAX_OBJECT_BYTES = spec["object_bytes"]
    _local._write_all = _killing_write_all
    journal = Journal(spec["journal"])
    kill = spec.get("kill") or {}
    store = KillingStore(spec["root"], journal, kind=kill.get("kind", "data"), nth=kill.get("nth", 0),
                         phase=kill.get("phase", "mid"), fraction=kill.get("fraction", 0.5))
    if spec["mode"] == "loop":  # steps in a cycle, a fresh attempt number for every save
        cycle, base = spec["cycle"], spec["attempt_base"]
        saves: Iterable[tuple[int, int]] = ((cycle[k % len(cycle)], base + k) for k in range(LOOP_SAVES))
    else:
        saves = [(int(s), int(a)) for s, a in spec["plan"]]
    state = make_state(0, 0, spec["tensors"], spec["numel"])  # allocated once, refilled per save
    journal.write(ev="ready")
    for step, attempt in saves:
        if time.monotonic() > deadline:
            break
        state = _save_one(store, journal, state, step, attempt, spec)
    journal.write(ev="finished", **store.counts)
