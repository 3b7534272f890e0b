"""Cutting global tensors into the regions the ranks of a target layout hold (``--layout``).

A converted universal checkpoint stores global tensors; with a layout and sharding rules it
stores each one in chunks that are exactly the regions some rank of that layout holds, so every
rank of a job started at that layout reads whole chunks and nothing else.

The rules map *local* tensors to global regions, and a global checkpoint has no local tensors,
so this module first inverts them: for every rank and global tensor it derives the local name
(undoing ``Pipeline`` renumbering; a rank on another stage holds nothing) and the local shape
(from the global shape and the shard rule's kind), then lets the real rules resolve those local
tensors (``Rules.resolve``, which validates every shape) and the save planner
(``ckpt._reshard.plan_save``) check that the regions tile each tensor once. Tensors no shard
rule matches, or matched by ``zero_flat`` (flat optimizer partitions have no per-tensor local
shape), are stored whole, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from ckpt.formats._base import TensorInfo
from ckpt.layout import Layout
from ckpt.regions import Box

__all__ = ["LayoutPlan", "layout_regions", "parse_layout_text"]


@dataclass(frozen=True)
class LayoutPlan:
    """``regions(name, shape)`` -> ``[(box, storage order), ...]``; ``record``: the manifest's
    layout field; ``world_size``: ranks of the layout."""

    regions: Callable[[str, tuple[int, ...]], list[tuple[Box, Optional[tuple[int, ...]]]]]
    record: dict[str, Any]
    world_size: int


def parse_layout_text(text: str) -> Layout:
    """``"tp=2,pp=2,dp=4"`` -> ``Layout.grid(tp=2, pp=2, dp=4)`` (Megatron order pp, dp, tp)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"layout {text!r}: {part!r} must look like AXIS=SIZE (e.g. tp=2,pp=2,dp=4)")
        sizes[key.strip()] = int(value)
    if not sizes:
        raise ValueError(f"layout {text!r} names no axis (e.g. tp=2,pp=2,dp=4)")
    return Layout.grid(**sizes)


def _load_rules(rules: Any) -> Any:
    from ckpt.rules import Rules, load_rules

    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str):
        return load_rules(rules)
    raise ValueError("a layout needs sharding rules: pass rules= (a Rules, a shipped name or a rules file)")


def _local_for(rules: Any, name: str, shape: tuple[int, ...], lay: Layout) -> Union[None, str, tuple[str, tuple[int, ...], Optional[tuple[int, ...]]]]:
    """``(local name, local shape, global shape hint)`` at ``lay``; None if the rank holds none;
    a string saying why when the rules cannot place it."""
    from ckpt._rules_base import even_chunk, compiled_pattern
    from ckpt._rules_kinds import Fused, Pipeline, Replicated, Sharded, Split, Vocab, padded_vocab_size

    local = name
    for rule in reversed(rules.renames):
        if not isinstance(rule, Pipeline):
            continue
        m = compiled_pattern(rule.pattern).fullmatch(local)
        if m is None or not (m.group("layer") or "").isdigit():
            continue
        stage, index = rule.locate(int(m.group("layer")), lay.size(rule.axis))
        if stage != lay.coord(rule.axis):
            return None
        local = local[: m.start("layer")] + str(index) + local[m.end("layer") :]
    if rules.global_name(local, lay) != name:
        return f"no local name renames to it at {lay.describe()}"
    hits = rules.matching(name)
    if len(hits) != 1:
        return "no shard rule matches it" if not hits else f"{len(hits)} shard rules match it"
    rule = hits[0][1]

    def n_c(axis: str) -> tuple[int, int]:
        return lay.size(axis), lay.coord(axis)

    def with_dim(dim: int, size: int) -> tuple[int, ...]:
        return tuple(size if d == dim else s for d, s in enumerate(shape))

    if isinstance(rule, Replicated):
        return local, shape, None
    if isinstance(rule, Split) and rule.dim < len(shape):
        n, c = n_c(rule.axis)
        if rule.global_size is None and shape[rule.dim] % n:
            raise ValueError(
                f"tensor {name!r}: dim {rule.dim} of size {shape[rule.dim]} does not split evenly over {rule.axis}={n} "
                f"(rule {rule.describe()}); give the rule a global_size for an uneven split"
            )
        size = even_chunk(rule.global_size, n, c)[1] if rule.global_size is not None else shape[rule.dim] // n
        return local, with_dim(rule.dim, size), None
    if isinstance(rule, Fused) and rule.dim < len(shape):
        n, _ = n_c(rule.axis)
        rows = sum((u // n if u % n == 0 else 1) * rule.unit for _, u in rule.parts)
        return local, with_dim(rule.dim, rows), None
    if isinstance(rule, Vocab) and rule.dim < len(shape):
        n, _ = n_c(rule.axis)
        per = -(-rule.size // n) if rule.padding == "any" else padded_vocab_size(rule.size, n, rule.pad_to_multiple, rule.padding) // n
        return local, with_dim(rule.dim, per), None
    if isinstance(rule, Sharded):
        sizes = list(shape)
        for axis, p in zip(rule.mesh, rule.placements):
            if p[0] == "shard" and p[1] < len(sizes):
                n, c = n_c(axis)
                sizes[p[1]] = even_chunk(sizes[p[1]], n, c)[1]
        return local, tuple(sizes), shape
    return f"its rule ({rule.kind}) has no per-tensor local shape"


def layout_regions(layout: Any, rules: Any, infos: Sequence[TensorInfo], warnings: list[str]) -> LayoutPlan:
    """The regions of every tensor under ``layout`` and ``rules`` (see the module docstring).

    Raises:
        RulesError / PlanError: the rules do not fit the tensors (every problem listed).
    """
    from ckpt._reshard import plan_save
    from ckpt._save import storage_order
    from ckpt._sharding import layout_json

    if isinstance(layout, str):
        layout = parse_layout_text(layout)
    if not isinstance(layout, Layout):
        raise ValueError("rules need a layout: pass layout= (e.g. 'tp=2,pp=2,dp=2')")
    rules = _load_rules(rules)
    shapes = {i.name: i.shape for i in infos}
    dtypes = {i.name: i.dtype for i in infos}
    unplaced: dict[str, str] = {}
    per_rank, per_rank_dtypes = [], []
    for lay in layout.all_ranks():
        local, hints, origin = {}, {}, {}
        for name, shape in shapes.items():
            got = _local_for(rules, name, shape, lay)
            if isinstance(got, str):
                unplaced.setdefault(name, got)
            elif got is not None:
                lname, lshape, hint = got
                local[lname], origin[lname] = lshape, name
                if hint is not None:
                    hints[lname] = hint
        mappings = rules.resolve(local, lay, global_shapes=hints)
        per_rank.append(mappings)
        per_rank_dtypes.append({ln: dtypes[origin[ln]] for ln in mappings})
    plan = plan_save(per_rank, per_rank_dtypes)
    regions: dict[str, set[tuple[Box, Optional[tuple[int, ...]]]]] = {}
    for items in plan.writes:
        for item in items:
            regions.setdefault(item.name, set()).add((item.region, storage_order(item.split_dim, item.region.ndim)))
    for name, shape in plan.global_shapes.items():
        if name in shapes and tuple(shape) != shapes[name]:
            raise ValueError(f"tensor {name!r}: the rules give global shape {list(shape)} at {layout.describe()}, the checkpoint has {list(shapes[name])}")
    for name, why in unplaced.items():
        if name not in regions:
            warnings.append(f"tensor {name!r} stored whole: {why}")

    def region_list(name: str, shape: tuple[int, ...]) -> list[tuple[Box, Optional[tuple[int, ...]]]]:
        found = regions.get(name)
        if not found:
            return [(Box.whole(shape), None)]
        return sorted(found, key=lambda r: (r[0].offsets, r[0].sizes))

    return LayoutPlan(region_list, layout_json(layout, rules), layout.world_size)
