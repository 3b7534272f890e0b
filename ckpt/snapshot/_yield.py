"""Give the copier a core: fewer intra-op threads on the training thread while a host copy runs.

On a CPU whose every core trains, the copier shares a core with one of torch's intra-op
threads, and each parallel region then waits for that thread: measured on 2 cores, a bare
background copy of the state cost training a quarter of its throughput, and the same copy with
one training thread on the other core cost almost nothing. So while a snapshot's host copy runs,
the training thread runs its parallel regions with ``k`` fewer threads, and gets them back at
the first hook on the training thread after the copy is done (a parameter's gradient
accumulated, a guarded module's forward, an optimizer step), or at ``wait()``/``close()``.

``torch.set_num_threads`` acts on the calling thread's OpenMP team, so lowering and restoring
happen only on the thread that called ``snapshot()``; hooks running elsewhere do nothing.

Opt-in (``SnapshotPolicy(yield_threads=...)``): with another thread count CPU kernels may split
reductions differently, and when the threads come back depends on timing, so training results
are no longer bit-reproducible from run to run.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch

__all__ = ["CoreYield", "auto_yield_threads"]

log = logging.getLogger("ckpt.snapshot")


def auto_yield_threads() -> int:
    """1 when torch trains on every core this process may run on (and on more than one),
    else 0: with a core to spare the copier takes that one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    n = torch.get_num_threads()
    return 1 if n > 1 and n >= cores else 0


class CoreYield:
    """Lowers torch's intra-op threads of one thread while host copies are pending.

    Args:
        threads: how many threads to give up (``None``: ``auto_yield_threads()`` at each
            ``lower()``; 0: never).
    """

    def __init__(self, threads: Optional[int]) -> None:
        self.threads = threads
        self._owner: Optional[int] = None  # the thread that lowered, while lowered
        self._before = 0
        self.lowered_count = 0  # how many times the threads were lowered (for stats and tests)

    @property
    def lowered(self) -> bool:
        return self._owner is not None

    def lower(self) -> None:
        """On the training thread, when a snapshot with host tensors was queued."""
        if self._owner is not None:
            return  # still lowered for the copy before
        k = auto_yield_threads() if self.threads is None else self.threads
        n = torch.get_num_threads()
        if k <= 0 or n <= 1:
            return
        self._before = n
        self._owner = threading.get_ident()
        torch.set_num_threads(max(1, n - k))
        self.lowered_count += 1

    def restore(self) -> None:
        """Give the threads back (only on the thread that lowered them)."""
        if self._owner is None or self._owner != threading.get_ident():
            return
        self._owner = None
        torch.set_num_threads(self._before)

    def restore_if(self, copies_pending: int) -> None:
        """``restore()`` once no host copy is pending (cheap: called from hooks)."""
        if self._owner is not None and copies_pending == 0:
            self.restore()
