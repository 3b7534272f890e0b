"""Build a ``Layout`` from the running job: a ``torch.distributed`` process group or a
``DeviceMesh``. The only place that turns torch's view of the mesh into the pure ``Layout``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from ckpt.layout import DEFAULT_ORDER, Layout

__all__ = ["layout_from_process_group", "layout_from_device_mesh"]


def _dist_rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, or ``(0, 1)`` when not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def layout_from_process_group(
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    order: Sequence[str] = DEFAULT_ORDER,
    **sizes: int,
) -> Layout:
    """The layout of this process in a job of ``world_size`` ranks cut into ``sizes``.

    ``layout_from_process_group(tp=4, pp=2)`` on 32 ranks gives ``pp=2, dp=4, tp=4`` (dp is
    inferred when not given). ``rank`` and ``world_size`` default to the default process group's
    (rank 0 of 1 when ``torch.distributed`` is not initialised).

    Args:
        rank: this process's rank; default from ``torch.distributed``.
        world_size: number of ranks; default from ``torch.distributed``.
        order: axis names slowest-varying first (Megatron: ``pp, dp, tp``); axes not listed
            are appended, fastest last, in call order.
        **sizes: axis sizes, e.g. ``tp=2``.

    Raises:
        ValueError: a size is not an integer >= 1, the sizes do not multiply to the world size
            (or do not divide it, when dp is inferred), or the rank is outside the world.
    """
    if rank is None or world_size is None:
        dist_rank, dist_world = _dist_rank_and_world()
        rank = dist_rank if rank is None else rank
        world_size = dist_world if world_size is None else world_size
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"world_size {world_size!r} must be an integer >= 1")
    for name, size in sizes.items():
        if type(size) is not int or size < 1:
            raise ValueError(f"layout axis {name}={size!r} must be an integer >= 1")
    given = math.prod(sizes.values())
    described = ", ".join(f"{n}={s}" for n, s in sizes.items()) or "no axes"
    if "dp" not in sizes:
        if world_size % given:
            raise ValueError(
                f"cannot infer dp: world size {world_size} is not divisible by the product {given} "
                f"of {described}; fix the axis sizes or pass dp= explicitly"
            )
        sizes = {**sizes, "dp": world_size // given}
    elif given != world_size:
        raise ValueError(
            f"layout {described} has {given} ranks but the world size is {world_size}; "
            "the axis sizes must multiply to the world size"
        )
    return Layout.grid(rank=rank, order=order, **sizes)


def layout_from_device_mesh(mesh: Any) -> Layout:
    """The layout of this process in ``mesh`` (a ``torch.distributed.device_mesh.DeviceMesh``).

    Axes are the mesh's dimension names and sizes, slowest first; the rank is this process's
    row-major position in the mesh.

    Raises:
        ValueError: the mesh has no dimension names, this process is not in it, or its ranks are
            not ``arange(world).reshape(shape)`` (sub-meshes and permuted meshes are not
            supported yet).
    """
    import torch.distributed as dist

    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError(
            "the device mesh has no dimension names; create it with "
            "init_device_mesh(..., mesh_dim_names=('dp', 'tp')) so its axes can be recorded"
        )
    shape = tuple(int(d) for d in mesh.mesh.shape)
    ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    if ranks != list(range(math.prod(shape))):
        raise ValueError(
            f"device mesh {dict(zip(names, shape))} holds ranks {ranks[:16]}{'...' if len(ranks) > 16 else ''}; "
            "meshes whose ranks are not arange(world_size).reshape(shape) (the whole job, row-major) "
            "are not supported yet: pass the root mesh, not a sub-mesh or a permuted one"
        )
    me = dist.get_rank()
    if me not in ranks:  # a mesh over the first ranks of a larger job
        raise ValueError(f"rank {me} is not in device mesh {dict(zip(names, shape))}")
    return Layout(tuple((str(n), s) for n, s in zip(names, shape)), ranks.index(me))
