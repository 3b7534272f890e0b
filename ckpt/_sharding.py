"""Glue between a rank's flattened state and the sharding rules: which local tensor holds
which region of which logical tensor. Identity mappings when no rules are given; DTensors are
mapped by their own placements (``ckpt.rules.mapping_from_placements``), rules or not."""

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
    tensors: Mapping[str, torch.Tensor],
    layout: Optional[Layout],
    rules: Any,
    rank: int,
    world_size: int,
    *,
    dtensors: Optional[Mapping[str, Any]] = None,
) -> dict[str, TensorMapping]:
    """Map every local tensor to global regions.

    DTensors' local shards (``dtensors``, default ``tensors.dtensors`` when ``tensors`` is a
    ``FlatState.tensors``) are mapped by their placements and need no rules; their mesh
    dimension names must be axes of ``layout`` with the same sizes and this rank's coordinates
    (an axis the layout lacks counts as size 1). Without rules every other tensor is the whole
    global tensor of its own name (replicas by name). With rules, every other tensor except
    rank-local ones (``rank<NNNNN>/...``) must be covered by exactly one rule (``ZeroFlat``
    params therefore never select DTensors); the rules raise ``RulesError`` listing every
    problem otherwise.

    Raises:
        RulesError: a DTensor's mesh does not match the layout, or the rules do not cover
            the other tensors; every problem listed.
    """
    layout = check_layout(layout, rules, rank, world_size)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    if dtensors is None:
        dtensors = getattr(tensors, "dtensors", None) or {}
    placed = {n: info for n, info in dtensors.items() if n in shapes and not _rank_local(n)}
    out = _dtensor_mappings(shapes, placed, layout)
    rest = {n: s for n, s in shapes.items() if n not in placed}
    if rules is None:
        out.update({n: TensorMapping.identity(n, s) for n, s in rest.items()})
    else:
        out.update(rules.resolve({n: s for n, s in rest.items() if not _rank_local(n)}, layout))
        out.update({n: TensorMapping.identity(n, s, "rank-local") for n, s in rest.items() if _rank_local(n)})
    return {n: out[n] for n in shapes}


def _dtensor_mappings(shapes: Mapping[str, tuple[int, ...]], placed: Mapping[str, Any], layout: Layout) -> dict[str, TensorMapping]:
    """Mappings of DTensor local shards from their placements (``DTensorInfo`` each)."""
    if not placed:
        return {}
    from ckpt.rules import RulesError, mapping_from_placements

    out, problems = {}, []
    for name, info in placed.items():
        bad = [
            f"{axis}={size} (coordinate {coord})"
            for axis, size, coord in zip(info.mesh_axes, info.mesh_sizes, info.mesh_coords)
            if layout.size(axis) != size or layout.coord(axis) != coord
        ]
        if bad:
            mesh = ", ".join(f"{a}={s}" for a, s in zip(info.mesh_axes, info.mesh_sizes))
            problems.append(
                f"DTensor {name!r}: mesh dim(s) {', '.join(bad)} of its mesh ({mesh}) do not match layout "
                f"{layout.describe()} at rank {layout.rank} (coordinates {layout.coords or '{}'})"
            )
            continue
        try:
            out[name] = mapping_from_placements(
                name, shapes[name], info.global_shape, layout, info.mesh_axes, info.placements, rule="dtensor"
            )
        except RulesError as e:
            problems.extend(f"DTensor {name!r}: {p}" for p in e.problems)
    if problems:
        raise RulesError(
            problems,
            where=f"mapping DTensors at rank {layout.rank}",
            fix="Pass layout= with the DTensors' device mesh axes: Layout(tuple(zip(mesh.mesh_dim_names, "
            "mesh.shape)), rank=rank) for a whole-job mesh, whose ranks are arange(world).reshape(shape).",
        )
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
