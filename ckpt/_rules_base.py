"""Shared pieces of the rules language: limits, errors, validation and geometry helpers."""

from __future__ import annotations

import itertools
import operator
import re
import string
from functools import lru_cache
from typing import Any, Optional, Sequence

from ckpt.errors import CheckpointError
from ckpt.layout import Layout
from ckpt.regions import Box

RULES_FORMAT = "ckpt-rules"
RULES_VERSION = 1
MAX_RULES_BYTES = 1 << 20
MAX_RULES = 4096
MAX_PATTERN_CHARS = 1024
MAX_INT = 1 << 62
MAX_DIM = 64
VOCAB_PADDINGS = ("megatron", "multiple", "any")
ZERO_PARTITIONS = ("padded", "chunk")
_AXIS = re.compile(r"[a-z][a-z0-9_]{0,31}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")


class RulesError(CheckpointError, ValueError):
    """Rules are malformed, or do not cover a rank's tensors; every problem is listed.

    Attributes:
        problems: one line per problem (tensor, rule, rank coordinate, what to do).
    """

    def __init__(self, problems: Sequence[str], *, where: str = "", fix: str = "") -> None:
        self.problems = tuple(problems)
        head = f"{len(self.problems)} problem(s){(' ' + where) if where else ''}"
        body = "\n  ".join(self.problems)
        super().__init__(f"{head}:\n  {body}" + (f"\n{fix}" if fix else ""))


class _Problem(RulesError):
    """One problem with one tensor; ``Rules.resolve`` collects them into one ``RulesError``."""

    def __init__(self, message: str) -> None:
        super().__init__([message])
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- validation helpers --------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def compiled_pattern(pattern: str) -> "re.Pattern[str]":
    return re.compile(pattern)


def _bad(msg: str) -> RulesError:
    return RulesError([msg])


def _check_pattern(pattern: Any, what: str = "pattern") -> "re.Pattern[str]":
    if not isinstance(pattern, str) or not pattern:
        raise _bad(f"{what} must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _bad(f"{what} has {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    try:
        return compiled_pattern(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise _bad(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def _check_int(value: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _check_axis(axis: Any) -> str:
    if not isinstance(axis, str) or not _AXIS.fullmatch(axis):
        raise _bad(f"axis {axis!r} must be a layout axis name (lowercase letters, digits, '_', e.g. 'tp')")
    return axis


def _check_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _bad(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def _check_template(template: Any, allowed: set[str], what: str, require: Optional[str] = None) -> str:
    """A ``str.format`` template using only plain ``{name}`` fields from ``allowed``."""
    if not isinstance(template, str) or not template or len(template) > MAX_PATTERN_CHARS:
        raise _bad(f"{what} must be a non-empty string of at most {MAX_PATTERN_CHARS} characters")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise _bad(f"{what} {template!r} is not a valid template: {e}") from None
    used = set()
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if field not in allowed or spec or conv:
            raise _bad(
                f"{what} {template!r}: field {{{field}}} is not allowed; use plain fields from {sorted(allowed)}"
            )
        used.add(field)
    if require and require not in used:
        raise _bad(f"{what} {template!r} must contain {{{require}}}")
    return template


def _as_tuple(value: Any) -> Any:
    """Lists (from JSON) to tuples, recursively; other values unchanged."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _describe(layout: Layout) -> str:
    coords = ", ".join(f"{n}={c}" for n, c in layout.coords.items()) or "single"
    return f"rank {layout.rank} ({coords} of {layout.describe()})"


def even_chunk(total: int, n: int, c: int) -> tuple[int, int]:
    """torch.chunk / DTensor ``Shard``: ``(start, size)`` of part ``c`` of ``n`` (ceil pieces)."""
    size = -(-total // n) if total else 0
    start = min(c * size, total)
    return start, min(size, total - start)


def _replace(shape: Sequence[int], dim: int, size: int) -> tuple[int, ...]:
    return tuple(size if d == dim else s for d, s in enumerate(shape))


def _rows(shape: Sequence[int], dim: int, start: int, size: int) -> Box:
    """The box of ``shape`` with ``[start, start + size)`` along ``dim``, everything else whole."""
    return Box(_replace((0,) * len(shape), dim, start), _replace(shape, dim, size))



# -- flat-range geometry -------------------------------------------------------------------------


def _flat_index(offsets: Sequence[int], shape: Sequence[int]) -> int:
    index = 0
    for o, s in zip(offsets, shape):
        index = index * s + o
    return index


def _contiguous_boxes(box: Box, shape: Sequence[int]) -> list[Box]:
    """Cut ``box`` into boxes each contiguous in the C-order flattening of ``shape``, in C order."""
    j = box.ndim - 1
    while j > 0 and box.sizes[j] == shape[j]:
        j -= 1
    if j <= 0 or all(s == 1 for s in box.sizes[:j]):
        return [box]
    out = []
    for head in itertools.product(*(range(o, e) for o, e in zip(box.offsets[:j], box.ends[:j]))):
        out.append(Box(tuple(head) + box.offsets[j:], (1,) * j + box.sizes[j:]))
    return out


def _as_shape(shape: Any) -> Optional[tuple[int, ...]]:
    """``shape`` as a tuple of ints >= 0 (``torch.Size`` and numpy integers accepted), else None."""
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_DIM:
        return None
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        return None
    return out if all(s >= 0 for s in out) and not any(isinstance(s, bool) for s in shape) else None
