"""Turning a training state into (tensors, JSON tree) and back, without pickle.

``flatten`` walks the user's state (nested dicts, lists, tuples, tensors, numpy arrays, plain
values, and any object with ``state_dict``/``load_state_dict``), names every tensor by its path
(``model.layer.weight``) and encodes everything else as the tagged JSON tree of
``docs/format.md``. ``plan_restore`` walks a target state alongside a saved tree, lists every
mismatch at once, and returns which tensors to fill in place and which ``load_state_dict``
calls to make once the bytes are in.

A ``torch.distributed.tensor.DTensor`` is stored through its local shard: ``flatten`` puts
``to_local()`` (same storage, so loads fill the DTensor in place) under the DTensor's path and
records its mesh, placements and global shape as plain data in ``FlatState.dtensors``; the
sharding glue maps it by its placements, no rules needed. Its tree node stays
``{"$tensor": name}``: the local name is the global name, so a plain load finds it whole.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ckpt._tensors import dtype_name, numpy_to_tensor, torch_dtype
from ckpt.errors import StateMismatchError, UnsupportedStateError
from ckpt.metadata import TensorMeta

__all__ = ["FlatState", "DTensorInfo", "TensorTable", "flatten", "RestorePlan", "plan_restore", "restore_plain", "mark_shards"]


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _key_str(k: Any) -> str:
    return k if isinstance(k, str) else repr(k) if isinstance(k, tuple) else str(k)


@dataclass(frozen=True)
class DTensorInfo:
    """Where a DTensor's local shard lies, as plain data (no torch types).

    Attributes:
        mesh_axes: the device mesh's dimension names, in mesh order.
        mesh_sizes: the size of each mesh dimension.
        mesh_coords: this rank's coordinate on each mesh dimension.
        placements: one per mesh dimension: ``("shard", dim)`` or ``("replicate",)``.
        global_shape: the DTensor's logical shape.
    """

    mesh_axes: tuple[str, ...]
    mesh_sizes: tuple[int, ...]
    mesh_coords: tuple[int, ...]
    placements: tuple[tuple[Any, ...], ...]
    global_shape: tuple[int, ...]


class TensorTable(dict):
    """``name -> tensor`` (a ``dict``) that also carries ``dtensors``, the ``DTensorInfo`` of
    its DTensor entries, so code handed only ``FlatState.tensors`` still knows them."""

    dtensors: dict[str, DTensorInfo]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dtensors = {}


class _DTensorRef(dict):
    """The tree node ``{"$tensor": name}`` of a DTensor: ``mark_shards`` leaves it whole."""


@dataclass
class FlatState:
    """A flattened state: ``tree`` is the JSON encoding, ``tensors`` maps names to tensors.

    Attributes:
        dtensors: ``DTensorInfo`` of the entries of ``tensors`` that are DTensors' local shards
            (the same dict as ``tensors.dtensors``).
    """

    tree: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=TensorTable)
    ndarrays: set[str] = field(default_factory=set)
    rank_local: tuple[str, ...] = ()
    rank: int = 0
    dtensors: dict[str, DTensorInfo] = field(default_factory=dict)
    #: ``id(obj) -> obj.state_dict()`` as flattened, for each stateful object: a restore fills
    #: the tensors of exactly these dicts and must hand the same dicts to ``load_state_dict``
    #: (an object may return fresh tensors from every ``state_dict()`` call)
    state_dicts: dict[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, TensorTable):
            self.tensors = TensorTable(self.tensors)
        self.tensors.dtensors = self.dtensors


def flatten(state: Any, *, rank_local: tuple[str, ...] = (), rank: int = 0) -> FlatState:
    """Encode ``state`` as a tagged JSON tree plus named tensors.

    Args:
        state: the state to encode.
        rank_local: top-level keys whose tensors belong to this rank only; their names get a
            ``rank<NNNNN>/`` prefix so they never count as replicas of another rank's tensors.
        rank: this process's rank.

    Raises:
        UnsupportedStateError: for a value that cannot be stored without pickle (its path is
            named), or two tensors that would get the same name.
    """
    out = FlatState(tree=None, rank_local=tuple(rank_local), rank=rank)
    out.tree = _encode(state, "", out, depth=0)
    return out


def _add_tensor(out: FlatState, name: str, t: torch.Tensor) -> str:
    if not name:
        name = "tensor"
    if out.rank_local and name.split(".", 1)[0] in out.rank_local:
        name = f"rank{out.rank:05d}/{name}"
    if name in out.tensors:
        raise UnsupportedStateError(
            f"two tensors in the state are both named {name!r} (keys that differ only in type or "
            "that contain '.' can collide); rename one of the keys"
        )
    dtype_name(t.dtype, where=f"tensor {name!r}")
    if t.is_sparse or t.layout != torch.strided:
        raise UnsupportedStateError(f"tensor {name!r} has layout {t.layout}; convert it with .to_dense() first")
    if t.device.type == "meta":
        raise UnsupportedStateError(f"tensor {name!r} is on the meta device and holds no data")
    out.tensors[name] = t
    return name


def _is_dtensor(obj: torch.Tensor) -> bool:
    if type(obj) is torch.Tensor or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


def _placement(p: Any, ndim: int, axis: str, where: str) -> tuple[Any, ...]:
    """A DTensor placement as plain data; ``Partial`` and strided shards are refused."""
    from torch.distributed.tensor import Replicate, Shard

    if type(p) is Shard:
        return ("shard", p.dim % ndim if ndim else p.dim)
    if type(p) is Replicate:
        return ("replicate",)
    if p.is_partial():
        raise UnsupportedStateError(
            f"{where}: DTensor placement {p} on mesh dim {axis!r} holds partial values that are not "
            "the tensor yet; redistribute it first (dtensor.redistribute(mesh, [Replicate(), ...]))"
        )
    raise UnsupportedStateError(
        f"{where}: DTensor placement {p} on mesh dim {axis!r} is not supported (only Shard(dim) and "
        "Replicate()); redistribute it to those, or save dtensor.full_tensor()"
    )


def _add_dtensor(out: FlatState, path: str, obj: Any) -> dict:
    """Store a DTensor's local shard under ``path`` and remember where it lies."""
    where = f"tensor {path or 'tensor'!r}"
    mesh = obj.device_mesh
    names = mesh.mesh_dim_names
    if names is None:
        raise UnsupportedStateError(
            f"{where}: its DTensor's device mesh has no dimension names; create the mesh with "
            "init_device_mesh(..., mesh_dim_names=('dp', ...)) so they can name layout axes"
        )
    coords = mesh.get_coordinate()
    if coords is None:
        raise UnsupportedStateError(f"{where}: this rank is not in its DTensor's device mesh {dict(zip(names, mesh.shape))}")
    ndim = len(obj.shape)
    info = DTensorInfo(
        mesh_axes=tuple(str(n) for n in names),
        mesh_sizes=tuple(int(s) for s in mesh.shape),
        mesh_coords=tuple(int(c) for c in coords),
        placements=tuple(_placement(p, ndim, str(a), where) for p, a in zip(obj.placements, names)),
        global_shape=tuple(int(s) for s in obj.shape),
    )
    local = obj.to_local()
    if callable(getattr(local, "wait", None)):  # an AsyncCollectiveTensor still in flight
        local = local.wait()
    name = _add_tensor(out, path, local.detach())  # detach() shares the DTensor's storage
    out.dtensors[name] = info
    return _DTensorRef({"$tensor": name})


def _encode(obj: Any, path: str, out: FlatState, depth: int) -> Any:
    if depth > 60:
        raise UnsupportedStateError(f"{path or '(root)'}: state nested more than 60 levels deep")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, torch.Tensor):
        if _is_dtensor(obj):  # before the Parameter test: FSDP2 parameters are both
            return _add_dtensor(out, path, obj)
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise UnsupportedStateError(
                f"{path}: tensor subclass {type(obj).__name__} is not supported; pass a plain "
                "tensor (e.g. its .detach() or a copy) instead"
            )
        return {"$tensor": _add_tensor(out, path, obj)}
    if isinstance(obj, np.ndarray):
        name = _add_tensor(out, path, numpy_to_tensor(obj, where=path))
        out.ndarrays.add(name)
        return {"$ndarray": name}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, out, depth + 1)
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise UnsupportedStateError(f"{path or '(root)'}: dict key {k!r} of type {type(k).__name__} cannot be stored")
            child = f"{path}.{_key_str(k)}" if path else _key_str(k)
            items.append([_encode(k, f"{path}[key]", out, depth + 1), _encode(v, child, out, depth + 1)])
        return {"$dict": items}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}" if path else str(i), out, depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}" if path else str(i), out, depth + 1) for i, v in enumerate(obj)]}
    if _is_stateful(obj):
        sd = obj.state_dict()
        out.state_dicts[id(obj)] = sd
        return _encode(sd, path, out, depth + 1)
    raise UnsupportedStateError(
        f"{path or '(root)'}: value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
        "stored without pickle; supported are tensors, numpy arrays, dict/list/tuple, int, float, "
        "str, bool, None, bytes, and objects with state_dict()/load_state_dict()"
    )


def decode_key(node: Any) -> Any:
    """Decode a dict key node (plain scalars, ``$float``, ``$tuple``, ``$bytes``)."""
    return _decode_plain(node)


def _decode_plain(node: Any) -> Any:
    if isinstance(node, list):
        return [_decode_plain(x) for x in node]
    if isinstance(node, dict):
        ((tag, val),) = node.items()
        if tag == "$float":
            return float(val)
        if tag == "$tuple":
            return tuple(_decode_plain(x) for x in val)
        if tag == "$bytes":
            return base64.b64decode(val)
        if tag == "$dict":
            return {_decode_plain(k): _decode_plain(v) for k, v in val}
        raise ValueError(f"tensor reference {node} where a plain value was expected")
    return node


# --------------------------------------------------------------------------------------------
# Restore planning
# --------------------------------------------------------------------------------------------
@dataclass
class RestorePlan:
    """What ``load`` must do for one target state.

    Attributes:
        state: the restored tree (the target's own containers and tensors where they fit).
        fills: ``(tensor name, target tensor)``: read the saved tensor into this tensor.
        ndarrays: ``(tensor name, target array)`` for numpy arrays.
        finalizers: ``load_state_dict`` calls to make after every fill succeeded (post-order).
        problems: every mismatch found (shape, dtype, missing entries).
        local_dtensors: a DTensor in the target is filled through its local shard (the saved
            tensor is that shard, e.g. a snapshot of the same layout).
    """

    state: Any = None
    fills: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    local_dtensors: bool = False


def plan_restore(target: Any, tree: Any, tensors: Mapping[str, TensorMeta], *, strict: bool = True, local_dtensors: bool = False) -> RestorePlan:
    """Match ``target`` against a saved ``tree``; never touches tensor data.

    Tensors in the target with the saved shape and dtype are filled in place; where the target
    has no tensor (``None``, a missing key, an empty optimizer state) a new CPU tensor is made.
    With ``local_dtensors`` the saved tensors of DTensors are their local shards (a snapshot in
    the same layout): a DTensor is filled through ``to_local()``; else a DTensor is refused
    (a checkpoint holds the logical tensor: load it with ``layout=``).
    """
    plan = RestorePlan(local_dtensors=local_dtensors)
    plan.state = _restore(target, tree, "", tensors, plan, strict)
    return plan


def _restore(target: Any, node: Any, path: str, tensors: Mapping[str, TensorMeta], plan: RestorePlan, strict: bool) -> Any:
    where = path or "(root)"
    if _is_stateful(target) and not isinstance(target, torch.Tensor):
        sd = target.state_dict()
        filled = _restore(sd, node, path, tensors, plan, strict)
        plan.finalizers.append(lambda t=target, s=filled: t.load_state_dict(s))
        return target
    if isinstance(node, dict):
        ((tag, val),) = node.items()
        if tag in ("$tensor", "$ndarray"):
            meta = tensors[val]
            shape = tuple(meta.shape)
            if isinstance(target, np.ndarray) and tag == "$ndarray":
                return _restore_ndarray(target, val, meta, where, plan)
            if isinstance(target, torch.Tensor) and _is_dtensor(target) and plan.local_dtensors:
                local = target.to_local()
                if tuple(local.shape) != shape or dtype_name(local.dtype, where=where) != meta.dtype:
                    plan.problems.append(
                        f"{where} (tensor {val!r}): local shard {dtype_name(local.dtype)} {list(local.shape)} in the state, "
                        f"{meta.dtype} {list(shape)} in the snapshot (another layout?)"
                    )
                else:
                    plan.fills.append((val, local))  # to_local() shares the DTensor's storage
                return target
            if isinstance(target, torch.Tensor) and _is_dtensor(target):
                plan.problems.append(
                    f"{where} (tensor {val!r}): the state holds a DTensor; load with layout= (its mesh's "
                    "axes) so its local shard is filled by its placements"
                )
                return target
            if isinstance(target, torch.Tensor):
                problems = []
                if tuple(target.shape) != shape:
                    problems.append(f"shape {list(target.shape)} in the state, {list(shape)} in the checkpoint")
                if dtype_name(target.dtype, where=where) != meta.dtype:
                    problems.append(f"dtype {dtype_name(target.dtype)} in the state, {meta.dtype} in the checkpoint")
                if problems:
                    plan.problems.append(f"{where} (tensor {val!r}): " + "; ".join(problems))
                    return target
                plan.fills.append((val, target))
                return target
            if target is not None and strict:
                plan.problems.append(f"{where}: checkpoint has tensor {val!r}, the state has {type(target).__name__}")
                return target
            try:
                new = torch.empty(shape, dtype=torch_dtype(meta.dtype))
            except Exception as e:  # an unknown dtype on this torch
                plan.problems.append(f"{where}: {e}")
                return target
            plan.fills.append((val, new))
            return new.numpy() if tag == "$ndarray" else new
        if tag == "$shard":
            plan.problems.append(
                f"{where}: saved as a shard of a sharded layout (local tensor {val!r}); load with "
                "layout= and rules= so each tensor is assembled from the logical tensors"
            )
            return target
        if tag == "$dict":
            return _restore_dict(target, val, path, tensors, plan, strict)
        if tag == "$tuple":
            items = list(target) if isinstance(target, tuple) and len(target) == len(val) else [None] * len(val)
            return tuple(
                _restore(t, n, f"{path}.{i}" if path else str(i), tensors, plan, strict) for i, (t, n) in enumerate(zip(items, val))
            )
        return _decode_plain(node)
    if isinstance(node, list):
        if isinstance(target, list) and len(target) == len(node):
            for i, n in enumerate(node):
                target[i] = _restore(target[i], n, f"{path}.{i}" if path else str(i), tensors, plan, strict)
            return target
        return [_restore(None, n, f"{path}.{i}" if path else str(i), tensors, plan, strict) for i, n in enumerate(node)]
    if isinstance(target, torch.Tensor) and strict:
        plan.problems.append(f"{where}: the state has a tensor, the checkpoint has {type(node).__name__} {node!r}")
        return target
    return node


def _restore_ndarray(target: np.ndarray, name: str, meta: TensorMeta, where: str, plan: RestorePlan) -> Any:
    tt = torch.from_numpy(target) if target.flags.writeable and target.dtype.kind in "biufc" else None
    if tt is None or tuple(tt.shape) != tuple(meta.shape) or dtype_name(tt.dtype, where=where) != meta.dtype:
        new = torch.empty(tuple(meta.shape), dtype=torch_dtype(meta.dtype))
        plan.fills.append((name, new))
        return new.numpy()
    plan.fills.append((name, tt))
    return target


def _restore_dict(target: Any, pairs: list, path: str, tensors: Mapping[str, TensorMeta], plan: RestorePlan, strict: bool) -> Any:
    out = target if isinstance(target, dict) else {}
    seen = set()
    for knode, vnode in pairs:
        k = _decode_plain(knode)
        seen.add(k)
        child = f"{path}.{_key_str(k)}" if path else _key_str(k)
        out[k] = _restore(out.get(k) if isinstance(target, dict) else None, vnode, child, tensors, plan, strict)
    if isinstance(target, dict) and strict:
        for k, v in target.items():
            if k not in seen and _holds_tensor(v):
                child = f"{path}.{_key_str(k)}" if path else _key_str(k)
                plan.problems.append(f"{child}: in the state but not in the checkpoint")
    return out


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, (torch.Tensor, np.ndarray)) or _is_stateful(v):
        return True
    if isinstance(v, Mapping):
        return any(_holds_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensor(x) for x in v)
    return False


def optimizers_in(state: Any, depth: int = 0) -> list[torch.optim.Optimizer]:
    """The optimizers in ``state`` (nested dicts, lists and tuples), in order."""
    if isinstance(state, torch.optim.Optimizer):
        return [state]
    if depth < 60 and isinstance(state, Mapping):
        return [o for v in state.values() for o in optimizers_in(v, depth + 1)]
    if depth < 60 and isinstance(state, (list, tuple)):
        return [o for v in state for o in optimizers_in(v, depth + 1)]
    return []


def init_optimizer_state(opt: torch.optim.Optimizer) -> bool:
    """Create the state tensors of an optimizer that has none yet, so that a load filling
    the target's own tensors has them to fill: one step at learning rate 0 on zero gradients
    (what ``torch.distributed.checkpoint`` does). Parameters do not change. Returns True when
    state was created (``opt.state.clear()`` undoes it)."""
    if opt.state:
        return False
    lrs = [g["lr"] for g in opt.param_groups]
    made = []
    for g in opt.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        for p in g["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
                made.append(p)
    try:
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p in made:
            p.grad = None
    return bool(opt.state)


def raise_problems(plan: RestorePlan, where: str) -> None:
    if plan.problems:
        raise StateMismatchError(plan.problems, where=where)


def restore_plain(target: Any, tree: Any, plan: RestorePlan, state_dicts: Mapping[int, Any] = {}) -> Any:  # noqa: B006 - read only
    """Bring the saved non-tensor values into ``target`` where its keys match; tensors are
    left alone (they are filled region by region through the sharding rules). Stateful
    objects get a ``load_state_dict`` finalizer in ``plan``, with the dict ``state_dicts``
    (``FlatState.state_dicts`` of the flatten whose tensors are filled) has for them, else a
    new ``state_dict()``. Returns the restored tree."""
    return _plain(target, tree, plan, state_dicts)


def _plain(target: Any, node: Any, plan: RestorePlan, sds: Mapping[int, Any]) -> Any:
    if _is_stateful(target) and not isinstance(target, torch.Tensor):
        sd = sds.get(id(target))
        if sd is None:
            sd = target.state_dict()
        filled = _plain(sd, node, plan, sds)
        plan.finalizers.append(lambda t=target, s=filled: t.load_state_dict(s))
        return target
    if isinstance(target, (torch.Tensor, np.ndarray)) or node is None and target is not None:
        return target
    if isinstance(target, dict) and isinstance(node, dict) and "$dict" in node:
        saved = {_decode_plain(k): v for k, v in node["$dict"]}
        for k in list(target):
            if k in saved:
                target[k] = _plain(target[k], saved[k], plan, sds)
        return target
    if isinstance(target, list) and isinstance(node, list) and len(target) == len(node):
        for i, n in enumerate(node):
            target[i] = _plain(target[i], n, plan, sds)
        return target
    if isinstance(node, dict) and set(node) & {"$tensor", "$ndarray", "$shard"}:
        return target  # the saved value was a tensor; the target's own tensor is filled by rules
    if _holds_tensor(target):
        return target
    try:
        return _decode_plain(node)
    except ValueError:  # a saved container holding tensor references: keep the target's
        return target


def mark_shards(tree: Any, sharded: set[str]) -> Any:
    """Replace references to tensors that rules split into regions with ``{"$shard": name}``:
    they are not whole tensors of the manifest, and a reader rebuilds them through rules.
    DTensor nodes stay ``$tensor``: their local name is the global tensor's name."""
    if not sharded:
        return tree
    if isinstance(tree, list):
        return [mark_shards(x, sharded) for x in tree]
    if isinstance(tree, dict):
        ((tag, val),) = tree.items()
        if tag == "$tensor" and val in sharded and not isinstance(tree, _DTensorRef):
            return {"$shard": val}
        if tag == "$dict":
            return {"$dict": [[k, mark_shards(v, sharded)] for k, v in val]}
        if tag == "$tuple":
            return {"$tuple": [mark_shards(x, sharded) for x in val]}
    return tree
