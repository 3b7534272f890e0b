"""Splitting a nested state into named tensors and plain (JSON) values, and back to ckpt trees.

Names are the dotted key paths, as ``ckpt.save`` gives them (``model.layers.0.weight``). A
subtree without tensors is one plain value under its path, converted to JSON (tuples become
lists, non-string dict keys become strings); a value that has no JSON form is skipped with a
warning rather than failing a whole conversion.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = ["split_state", "to_json_value", "plain_from_tree", "flat_tree", "NotJSON"]

_MAX_DEPTH = 64


class NotJSON(ValueError):
    """A value has no JSON form."""


def to_json_value(v: Any, depth: int = 0) -> Any:
    """``v`` as a JSON value, or ``NotJSON``."""
    if depth > _MAX_DEPTH:
        raise NotJSON("nested too deeply")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [to_json_value(x, depth + 1) for x in v]
    if isinstance(v, Mapping):
        out = {}
        for k, x in v.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise NotJSON(f"dict key of type {type(k).__name__}")
            out[str(k)] = to_json_value(x, depth + 1)
        return out
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", None) == 0 and not _is_tensor(v):
        return to_json_value(v.item(), depth + 1)  # numpy scalars
    raise NotJSON(f"type {type(v).__module__}.{type(v).__qualname__}")


def _is_tensor(v: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def _holds_tensor(v: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if _is_tensor(v):
        return True
    if isinstance(v, Mapping):
        return any(_holds_tensor(x, depth + 1) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensor(x, depth + 1) for x in v)
    return False


def split_state(obj: Any, *, on_tensor: Callable[[str, Any], None], plain: dict[str, Any], warnings: list[str], path: str = "", depth: int = 0) -> None:
    """Walk ``obj``: call ``on_tensor(name, tensor)`` for each tensor, put plain subtrees in ``plain``."""
    if depth > _MAX_DEPTH:
        warnings.append(f"{path or '(root)'}: nested more than {_MAX_DEPTH} levels; skipped")
        return
    if _is_tensor(obj):
        on_tensor(path or "tensor", obj)
        return
    if not _holds_tensor(obj):
        try:
            plain[path or "value"] = to_json_value(obj)
        except NotJSON as e:
            warnings.append(f"non-tensor value {path or '(root)'!r} skipped: it has no JSON form ({e})")
        return
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
    for k, v in items:
        split_state(v, on_tensor=on_tensor, plain=plain, warnings=warnings, path=f"{path}.{k}" if path else str(k), depth=depth + 1)


def plain_from_tree(tree: Any) -> dict[str, Any]:
    """Plain values of a ckpt state tree (``docs/format.md`` section 5) by dotted path."""
    out: dict[str, Any] = {}
    _walk_tree(tree, "", out, 0)
    return out


def _is_ref(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("$tensor", "$ndarray", "$shard")


def _tree_holds_ref(node: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if _is_ref(node):
        return True
    if isinstance(node, list):
        return any(_tree_holds_ref(x, depth + 1) for x in node)
    if isinstance(node, dict) and len(node) == 1:
        ((tag, val),) = node.items()
        if tag == "$dict":
            return any(_tree_holds_ref(v, depth + 1) for _, v in val)
        if tag == "$tuple":
            return any(_tree_holds_ref(v, depth + 1) for v in val)
    return False


def _walk_tree(node: Any, path: str, out: dict[str, Any], depth: int) -> None:
    from ckpt._state import decode_key

    if depth > _MAX_DEPTH or _is_ref(node):
        return
    if not _tree_holds_ref(node):
        try:
            out[path or "value"] = to_json_value(decode_key(node))
        except (NotJSON, ValueError):
            pass
        return
    if isinstance(node, list):
        for i, x in enumerate(node):
            _walk_tree(x, f"{path}.{i}" if path else str(i), out, depth + 1)
        return
    ((tag, val),) = node.items()
    pairs = val if tag == "$dict" else list(enumerate(val))
    for k, v in pairs:
        key = decode_key(k) if tag == "$dict" else k
        _walk_tree(v, f"{path}.{key}" if path else str(key), out, depth + 1)


def flat_tree(tensor_names: list[str], plain: Mapping[str, Any]) -> Any:
    """A ckpt state tree with every tensor and plain value at the top level, by full name."""
    from ckpt._state import flatten

    pairs: list[list[Any]] = [[name, {"$tensor": name}] for name in tensor_names]
    for key, value in plain.items():
        pairs.append([key, flatten(value).tree])
    return {"$dict": pairs}

