"""Restoring the hook's state from storage, and what the hook tells the agents about it.

The agents save the hook's state ``{"state": <training state>, "rng": RNGState}`` with the
job's layout and rules, the RNG states rank-local (``rank<NNNNN>/rng.*``: no rule need cover
them) whenever there is more than one rank or rules are given. ``load_hook_state`` reads such a
checkpoint back: a plain ``ckpt.load`` when the job gives neither rules nor a layout, else a
target-driven load of the training state through them and then of this rank's RNG states
(those of the saved rank whose plain values it restores).
"""

from __future__ import annotations

import logging
from typing import Any, Optional


__all__ = ["load_hook_state", "dtensor_json", "rng_rules"]  # and _walk, for the hook

log = logging.getLogger("ckpt.hook")


def load_hook_state(state: Any, rng: Any, storage: str, *, layout: Any, rules: Any, comm: Optional[Any], rank: int) -> Any:
    """Load the latest committed step of ``storage`` into ``state`` and the ``RNGState``
    ``rng``; a collective when ``comm`` is given. Returns ``ckpt.load``'s result.

    Raises:
        CheckpointNotFoundError: nothing is committed (the state is left as it was).
        StateMismatchError: the checkpoint does not fit the state.
    """
    import ckpt
    from ckpt.errors import StateMismatchError
    from ckpt.layout import Layout

    if rules is None and layout is None:  # the saved trees name every tensor
        return ckpt.load({"state": state, "rng": rng}, storage, comm=comm)
    # through the rules (fresh optimizers get their state created by ckpt.load), then this
    # rank's RNG states, saved rank-local under another name
    result = ckpt.load({"state": state}, storage, layout=layout, rules=rules, comm=comm)
    world = 1 if comm is None else comm.world_size
    at = layout or (Layout.single() if world == 1 else Layout.grid(dp=world, rank=rank))
    try:
        ckpt.load({"rng": rng}, storage, step=result.step, layout=layout, rules=rng_rules(result.manifest, at), comm=comm)
    except StateMismatchError as e:  # e.g. a checkpoint not written through the hook
        log.warning("rank %s: RNG states not restored from step %d: %s", rank, result.step, e)
    return result


def dtensor_json(state: Any) -> dict[str, Any]:
    """``{tensor name: DTensorInfo as JSON}`` of the DTensors in ``state`` (flattened: no copy)."""
    import dataclasses

    from ckpt._state import flatten

    return {n: dataclasses.asdict(info) for n, info in flatten(state).dtensors.items()}


def rng_rules(manifest: Any, target: Any) -> Any:
    """Rules that load the RNG states of the rank at layout ``target``: the saved ones of the
    rank whose plain values it restores (``rank<NNNNN>/rng.*`` when saved rank-local, else
    ``rng.*``)."""
    from ckpt.resume import source_rank
    from ckpt.rules import Replicated, Rules, Tied

    axes = (manifest.layout or {}).get("axes") if isinstance(manifest.layout, dict) else None
    try:
        src = source_rank(axes, manifest.world_size, target)
    except ValueError:
        src = 0
    prefix = f"rank{src:05d}/"
    if not any(n.startswith(prefix + "rng.") for n in manifest.tensors):
        return Rules(shards=(Replicated(pattern=r"rng\..+"),), name="hook-rng")
    return Rules(renames=(Tied(pattern=r"rng\.(?P<rest>.+)", target=prefix + "rng.{rest}"),), shards=(Replicated(pattern=f"rank{src:05d}/rng\\..+"),), name="hook-rng")


def _walk(obj: Any, depth: int = 0) -> Any:
    yield obj
    if depth < 8 and isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)
