"""Glue between a rank's flattened state and the sharding rules: which local tensor holds
which region of which logical tensor. Identity mappings when no rules are given."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ckpt.layout import Layout
from ckpt.mapping import TensorMapping

__all__ = ["resolve_rules", "local_mappings", "layout_json", "check_layout"]


def resolve_rules(rules: Any) -> Any:
    """A ``Rules`` object from a ``Rules``, a shipped name, a path, or ``None``."""
    if rules is None:
        return None
    from ckpt.rules import Rules, load_rules

    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str):
        return load_rules(rules)
    raise TypeError(f"rules must be a ckpt.rules.Rules, a shipped rules name or a path, got {type(rules).__name__}")


def check_layout(layout: Optional[Layout], rules: Any, rank: int, world_size: int) -> Layout:
    """The layout to use; it must agree with the process group."""
    if layout is None:
        if rules is not None and world_size > 1:
            raise ValueError("sharding rules need a layout: pass layout=ckpt.layout.Layout.grid(tp=..., pp=..., dp=..., rank=rank)")
        layout = Layout.grid(dp=world_size, rank=rank) if world_size > 1 else Layout.single()
    if layout.world_size != world_size or layout.rank != rank:
        raise ValueError(
            f"layout {layout.describe()} (rank {layout.rank} of {layout.world_size}) does not match the "
            f"process group (rank {rank} of {world_size}); build it with Layout.grid(..., rank=rank)"
        )
    return layout


def local_mappings(
    tensors: Mapping[str, torch.Tensor], layout: Optional[Layout], rules: Any, rank: int, world_size: int
) -> dict[str, TensorMapping]:
    """Map every local tensor to global regions.

    Without rules each tensor is the whole global tensor of its own name (replicas by name).
    With rules, every tensor except rank-local ones (``rank<NNNNN>/...``) must be covered by
    exactly one rule; the rules raise ``RulesError`` listing every problem otherwise.
    """
    layout = check_layout(layout, rules, rank, world_size)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    if rules is None:
        return {n: TensorMapping.identity(n, s) for n, s in shapes.items()}
    ruled = {n: s for n, s in shapes.items() if not _rank_local(n)}
    out = dict(rules.resolve(ruled, layout))
    out.update({n: TensorMapping.identity(n, s, "rank-local") for n, s in shapes.items() if _rank_local(n)})
    return out


def _rank_local(name: str) -> bool:
    return name.startswith("rank") and "/" in name[:10]


def layout_json(layout: Optional[Layout], rules: Any) -> Optional[dict[str, Any]]:
    """What the manifest records about the writers' layout (``None`` for a plain save)."""
    if layout is None and rules is None:
        return None
    out: dict[str, Any] = {} if layout is None else layout.to_json()
    out["rules"] = None if rules is None else rules.to_json()
    return out
