"""How a rank's local tensors map onto logical (global) tensors: the output of sharding rules
and the input of the resharding planner. Pure data, no torch.

A local tensor holds one or more **pieces**. A piece says: this box of my local tensor holds
that region of global tensor ``name``. Local box and global region have the same number of
elements and correspond element by element **in C order of each**: when their sizes are equal
this is a plain box copy (a tensor-parallel slice); when the local box is 1-D (a flat ZeRO/FSDP
partition) its elements are the region's elements in C order. Elements of a local tensor that
no piece covers are padding (zero-filled on load, never saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ckpt.regions import Box

__all__ = ["Piece", "TensorMapping", "mapping_to_json", "mapping_from_json"]


@dataclass(frozen=True)
class Piece:
    """A box of a local tensor that holds a region of a global tensor.

    Attributes:
        local: box in the local tensor's coordinates.
        name: the global (logical) tensor's name.
        region: box in the global tensor, with ``region.numel == local.numel``.
        split_dim: the global dimension along which ``region`` is cut out of its tensor by the
            layout (the writer stores that dimension outermost so any later re-slicing along it
            is one contiguous byte range); ``None`` when replicated or when ``local`` is flat.
    """

    local: Box
    name: str
    region: Box
    split_dim: Optional[int] = None

    def __post_init__(self) -> None:
        if self.local.numel != self.region.numel:
            raise ValueError(
                f"piece of {self.name!r}: local box {self.local.sizes} has {self.local.numel} elements "
                f"but region {self.region.sizes} has {self.region.numel}"
            )
        if self.local.sizes != self.region.sizes and self.local.ndim != 1:
            raise ValueError(
                f"piece of {self.name!r}: local box {self.local.sizes} and region {self.region.sizes} "
                "must have equal sizes unless the local box is flat (1-D)"
            )


@dataclass(frozen=True)
class TensorMapping:
    """Where one local tensor's elements live in the logical tensors.

    Attributes:
        local_name: the tensor's name in this rank's state (``model.layers.0.attn.qkv.weight``).
        local_shape: its local shape.
        pieces: the boxes it holds, in local C order, not overlapping.
        global_shapes: the full shape of every global tensor a piece refers to.
        rule: the rule that produced this mapping (named in errors and in ``--explain``).
    """

    local_name: str
    local_shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    global_shapes: Mapping[str, tuple[int, ...]]
    rule: str = ""

    @staticmethod
    def identity(name: str, shape: tuple[int, ...], rule: str = "replicated") -> "TensorMapping":
        """The local tensor is the whole global tensor of the same name."""
        box = Box.whole(shape)
        return TensorMapping(name, tuple(shape), (Piece(box, name, box),), {name: tuple(shape)}, rule)


def mapping_to_json(m: TensorMapping) -> dict[str, Any]:
    """Compact JSON for the save collective: ``[[local offsets, sizes, name, offsets, sizes, split_dim], ...]``."""
    return {
        "shape": list(m.local_shape),
        "rule": m.rule,
        "globals": {k: list(v) for k, v in m.global_shapes.items()},
        "pieces": [
            [list(p.local.offsets), list(p.local.sizes), p.name, list(p.region.offsets), list(p.region.sizes), p.split_dim]
            for p in m.pieces
        ],
    }


def mapping_from_json(local_name: str, obj: Mapping[str, Any]) -> TensorMapping:
    """Inverse of ``mapping_to_json`` (input comes from the job's own ranks)."""
    pieces = tuple(
        Piece(Box(tuple(lo), tuple(ls)), name, Box(tuple(go), tuple(gs)), sd)
        for lo, ls, name, go, gs, sd in obj["pieces"]
    )
    return TensorMapping(
        local_name=local_name,
        local_shape=tuple(obj["shape"]),
        pieces=pieces,
        global_shapes={k: tuple(v) for k, v in obj["globals"].items()},
        rule=obj.get("rule", ""),
    )
