"""``python -m agents --run-dir DIR --rank R [--grace-s N] [--persist-url URL --persist-every M]``."""

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
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent r{a.rank} %(levelname)s %(message)s")
    cfg = AgentConfig(run_dir=a.run_dir, rank=a.rank, grace_s=a.grace_s, persist_url=a.persist_url, persist_every=a.persist_every)
    return Agent(cfg).serve()


if __name__ == "__main__":
    sys.exit(main())
