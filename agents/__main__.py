"""``python -m agents --run-dir DIR --rank R [--grace-s N] [--persist-url URL --persist-every M] [--shm-limit BYTES]``."""

from __future__ import annotations

import argparse
import logging
import sys

from agents._agent import Agent, AgentConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agents", description="per-rank snapshot agent")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--grace-s", type=float, default=30.0)
    p.add_argument("--persist-url", default=None)
    p.add_argument("--persist-every", type=int, default=0)
    p.add_argument("--shm-limit", type=int, default=0, help="bytes of shared memory all snapshot slots may hold (0: no limit but /dev/shm)")
    a = p.parse_args(argv)
    if a.shm_limit < 0:
        p.error(f"--shm-limit must be >= 0 bytes, not {a.shm_limit}")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent r{a.rank} %(levelname)s %(message)s")
    cfg = AgentConfig(run_dir=a.run_dir, rank=a.rank, grace_s=a.grace_s, persist_url=a.persist_url, persist_every=a.persist_every, shm_limit=a.shm_limit)
    return Agent(cfg).serve()


if __name__ == "__main__":
    sys.exit(main())
