"""The rendezvous of test and benchmark workers: rank 0 binds a ``TCPStore`` on port 0 of
loopback and publishes the port in a file; the others wait for the file (no fixed ports, so
parallel runs never collide)."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist

__all__ = ["rendezvous"]


def rendezvous(rank: int, world: int, rdv: str, timeout: timedelta) -> dist.TCPStore:
    """The job's store; ``rdv`` is a directory every rank sees.

    Raises:
        TimeoutError: rank 0 did not publish its port within ``timeout``.
    """
    port_file = os.path.join(rdv, "port")
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(store.port))
        os.replace(tmp, port_file)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 never published its port in {port_file}")
        time.sleep(0.01)
    with open(port_file) as f:
        port = int(f.read())
    return dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
