"""The port rank 0's agent hosts the agents' store on.

The port must stay free for the job's whole life: when agent 0 dies, the hook restarts it on the
same port, because the other agents know only that one. A port the kernel picks (port 0) lies in
its ephemeral range, from which it also hands out the source ports of outgoing connections, so
another process may hold it by the time agent 0 restarts. So we pick a port outside that range.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["ephemeral_range", "store_port_candidates", "pick_store_port"]

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_DEFAULT = (32768, 60999)
_BELOW = 8192  # how far below the ephemeral range we look


def ephemeral_range(path: Path = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        lo, hi = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return _LINUX_DEFAULT
    return (lo, hi) if 0 < lo <= hi <= 65535 else _LINUX_DEFAULT


def store_port_candidates(lo: int, hi: int) -> list[int]:
    """Ports outside ``[lo, hi]``: above it, and up to 8192 below it (never below 1024)."""
    return list(range(hi + 1, 65536)) + list(range(max(1024, lo - _BELOW), lo))


def pick_store_port(tries: int = 64) -> int:
    """A port outside the ephemeral range that nothing listens on now (0 if none was found:
    the caller then lets the kernel pick)."""
    candidates = store_port_candidates(*ephemeral_range())
    rng = random.SystemRandom()
    for _ in range(min(tries, len(candidates))):
        port = rng.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    return 0
