"""agents: the per-rank agent process (shared-memory snapshot slots, persisting to storage).

May import ``ckpt`` and ``recovery``; nothing imports it. Run as ``python -m agents --run-dir DIR
--rank R [--grace-s N] [--persist-url URL --persist-every M]`` (the hook ``ckpt.hook`` starts it
by module name). Parity with peer agents and coordinator registration are not built yet.
"""

from agents._agent import Agent, AgentConfig

__all__ = ["Agent", "AgentConfig"]
