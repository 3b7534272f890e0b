"""The agents' store port: outside the kernel's ephemeral range, free when picked."""

from __future__ import annotations

import socket
from pathlib import Path

from agents._ports import ephemeral_range, pick_store_port, store_port_candidates


def test_ephemeral_range_read_from_the_kernel_file(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(f) == (40000, 50000)


def test_ephemeral_range_falls_back_to_linux_default(tmp_path: Path) -> None:
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
    bad = tmp_path / "bad"
    for text in ("junk", "70000 80000", "500 100", ""):
        bad.write_text(text)
        assert ephemeral_range(bad) == (32768, 60999), text


def test_candidates_avoid_the_range_and_privileged_ports() -> None:
    c = store_port_candidates(32768, 60999)
    assert c and all(not 32768 <= p <= 60999 for p in c)
    assert min(c) == 32768 - 8192 and max(c) == 65535
    low = store_port_candidates(2000, 65535)  # nothing above: only below, never under 1024
    assert low == list(range(1024, 2000))


def test_picked_port_is_outside_the_range_and_bindable() -> None:
    lo, hi = ephemeral_range()
    port = pick_store_port()
    assert port and not lo <= port <= hi
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
