"""Parallel layouts: named mesh axes with sizes, and one rank's coordinates on them.

A ``Layout`` is pure data (no torch): the planners take it as input, the manifest records it.
Axes are listed slowest-varying first; the conventional Megatron order is ``pp, dp, tp``
(tensor-parallel ranks are adjacent). Any axis name is allowed (``tp``, ``pp``, ``dp``,
``zero``/``fsdp``, ``ep``, ...); an axis a layout does not list has size 1 and coordinate 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from ckpt.errors import ManifestError

__all__ = ["Layout", "parse_layout", "DEFAULT_ORDER", "MAX_WORLD_SIZE"]

#: Slowest to fastest: pipeline stages outermost, tensor-parallel ranks adjacent.
DEFAULT_ORDER = ("pp", "dp", "tp")
MAX_WORLD_SIZE = 1 << 20
_AXIS = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Layout:
    """A rank's place in a mesh of named axes.

    Attributes:
        axes: ``((name, size), ...)`` slowest-varying first; the rank number is the row-major
            index of the coordinates.
        rank: this rank, ``0 <= rank < world_size``.
    """

    axes: tuple[tuple[str, int], ...]
    rank: int = 0

    def __post_init__(self) -> None:
        names = [n for n, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"layout axes {names} repeat a name")
        for name, size in self.axes:
            if not isinstance(name, str) or not _AXIS.match(name):
                raise ValueError(f"layout axis name {name!r} must be lowercase letters, digits, '_' (e.g. 'tp')")
            if type(size) is not int or size < 1:
                raise ValueError(f"layout axis {name!r} has size {size!r}; sizes are integers >= 1")
        if self.world_size > MAX_WORLD_SIZE:
            raise ValueError(f"layout of {self.world_size} ranks exceeds {MAX_WORLD_SIZE}")
        if type(self.rank) is not int or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank!r} is outside the layout's {self.world_size} ranks ({self.describe()})")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def grid(cls, *, rank: int = 0, order: Sequence[str] = DEFAULT_ORDER, **sizes: int) -> "Layout":
        """``Layout.grid(tp=2, dp=2, rank=3)``: axes in ``order`` (others appended in call order)."""
        names = [n for n in order if n in sizes] + [n for n in sizes if n not in order]
        return cls(tuple((n, int(sizes[n])) for n in names), rank)

    @classmethod
    def single(cls) -> "Layout":
        """One process: no parallelism."""
        return cls((), 0)

    def with_rank(self, rank: int) -> "Layout":
        return Layout(self.axes, rank)

    # -- queries -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return math.prod(s for _, s in self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def coords(self) -> dict[str, int]:
        """This rank's coordinate on every axis."""
        out, rest = {}, self.rank
        for name, size in reversed(self.axes):
            out[name] = rest % size
            rest //= size
        return {n: out[n] for n in self.names}

    def size(self, axis: str) -> int:
        return self.sizes.get(axis, 1)

    def coord(self, axis: str) -> int:
        return self.coords.get(axis, 0)

    def rank_of(self, coords: Mapping[str, int]) -> int:
        """The rank at ``coords`` (axes left out are 0)."""
        r = 0
        for name, size in self.axes:
            c = coords.get(name, 0)
            if not 0 <= c < size:
                raise ValueError(f"coordinate {name}={c} is outside [0, {size})")
            r = r * size + c
        return r

    def group(self, axis: str) -> tuple[int, ...]:
        """Ranks that differ from this one only along ``axis``, ordered by that coordinate."""
        coords = self.coords
        return tuple(self.rank_of({**coords, axis: i}) for i in range(self.size(axis)))

    def all_ranks(self) -> Iterator["Layout"]:
        for r in range(self.world_size):
            yield self.with_rank(r)

    def describe(self) -> str:
        return ",".join(f"{n}={s}" for n, s in self.axes) or "single"

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The mesh only (the rank is per process, not part of a checkpoint's layout)."""
        return {"axes": [[n, s] for n, s in self.axes]}


def parse_layout(obj: Any, *, rank: int = 0, where: str = "layout") -> Layout:
    """Validate an untrusted ``{"axes": [[name, size], ...]}`` and build a ``Layout``."""
    if not isinstance(obj, dict) or set(obj) != {"axes"} or not isinstance(obj["axes"], list):
        raise ManifestError(f"{where}: must be an object {{'axes': [[name, size], ...]}}")
    axes = []
    for i, item in enumerate(obj["axes"]):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and type(item[1]) is int):
            raise ManifestError(f"{where}.axes[{i}]: must be [name, size]")
        axes.append((item[0], item[1]))
    try:
        return Layout(tuple(axes), rank)
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from e
