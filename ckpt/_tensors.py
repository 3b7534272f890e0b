"""Torch-side helpers: dtype names and zero-copy byte views of tensors."""

from __future__ import annotations

import numpy as np
import torch

from ckpt.errors import UnsupportedStateError
from ckpt.metadata import DTYPE_ITEMSIZE

__all__ = ["dtype_name", "torch_dtype", "byte_view", "host_contiguous", "numpy_to_tensor"]

_BY_NAME: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in DTYPE_ITEMSIZE if isinstance(getattr(torch, name, None), torch.dtype)
}
_BY_DTYPE: dict[torch.dtype, str] = {dt: name for name, dt in _BY_NAME.items()}


def dtype_name(dtype: torch.dtype, *, where: str = "") -> str:
    """Canonical format name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise UnsupportedStateError(
            f"{where or 'tensor'}: dtype {dtype} cannot be stored; supported: {sorted(_BY_NAME)}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a format dtype name; raises ``UnsupportedStateError`` if this torch lacks it."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedStateError(
            f"dtype {name!r} is not available in torch {torch.__version__}; upgrade torch to load it"
        ) from None


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, on the CPU and contiguous; a copy only when one of those needs it."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A flat ``uint8`` numpy view of a contiguous CPU tensor's elements (no copy)."""
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # one element with an odd stride still counts as contiguous
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8).numpy()


def numpy_to_tensor(a: np.ndarray, *, where: str) -> torch.Tensor:
    """Wrap a numpy array as a tensor for storage (object and structured arrays are refused)."""
    if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.kind not in "biufc":
        raise UnsupportedStateError(
            f"{where}: numpy array of dtype {a.dtype} cannot be stored without pickle; "
            "convert it to a numeric array or a list"
        )
    return torch.from_numpy(np.ascontiguousarray(a))
