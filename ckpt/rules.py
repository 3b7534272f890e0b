"""Sharding rules: the universal checkpoint language. Pure (no torch); only ``load_rules`` reads.

A ``Rules`` set turns one rank's local tensor names and shapes, plus its ``Layout``, into
``TensorMapping``s: which box of each local tensor holds which region of which global tensor
(``ckpt.mapping``). Two stages, each matched by ``re.fullmatch`` on the tensor name:

1. **renames** (``Pipeline``, ``Tied``), applied in order, each to the output of the previous:
   they turn a local name into the global name (pipeline stages renumber their local layers;
   a tied weight is stored as the tensor it is tied to).
2. **shard rules** (``Replicated``, ``Split``, ``Fused``, ``Vocab``, ``ZeroFlat``, ``Sharded``),
   matched on the global name: exactly one must match every tensor.

``resolve`` fails closed: a tensor no shard rule matches, or that two match, is an error, never
a default (DeepSpeed UCP's silent dim-0 concatenation is what this avoids). Every problem of a
rank is listed in one ``RulesError``. See ``docs/layouts.md``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ckpt.layout import Layout
from ckpt.mapping import TensorMapping
from ckpt._rules_base import (
    _as_shape,
    MAX_INT,
    MAX_RULES,
    MAX_RULES_BYTES,
    RULES_FORMAT,
    RULES_VERSION,
    RulesError,
    _NAME,
    _PLACEHOLDER,
    _Problem,
    _as_tuple,
    _bad,
    _describe,
    compiled_pattern,
)
from ckpt._rules_kinds import (
    Fused,
    Pipeline,
    Rename,
    Replicated,
    ShardRule,
    Sharded,
    Split,
    Tied,
    Vocab,
    ZeroFlat,
    _Ctx,
    _RENAME_KINDS,
    _SHARD_KINDS,
    mapping_from_placements,
    padded_vocab_size,
)


__all__ = [
    "RulesError",
    "Pipeline",
    "Tied",
    "Replicated",
    "Split",
    "Fused",
    "Vocab",
    "ZeroFlat",
    "Sharded",
    "Rules",
    "load_rules",
    "shipped_rules",
    "mapping_from_placements",
    "padded_vocab_size",
    "RULES_FORMAT",
    "RULES_VERSION",
]


# -- rule sets -----------------------------------------------------------------------------------


_FIX_MATCH = (
    "Every tensor needs exactly one shard rule: add one whose pattern fullmatches the global name "
    "(Replicated if every rank holds it whole), or narrow overlapping patterns."
)
_FIX_FIT = "Check the rule's sizes (heads, vocabulary, layers) and axes against the model configuration and the layout."


@dataclass(frozen=True)
class Rules:
    """A named set of renames and shard rules.

    Attributes:
        renames: ``Pipeline`` / ``Tied`` rules, applied in order.
        shards: shard rules; exactly one must match each (renamed) tensor name.
        name: shown in errors and recorded in the manifest.
        description: free text.
    """

    renames: tuple[Rename, ...] = ()
    shards: tuple[ShardRule, ...] = ()
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "renames", tuple(self.renames))
        object.__setattr__(self, "shards", tuple(self.shards))
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise _bad(f"rules name {self.name!r} must be 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(self.description, str) or len(self.description) > 4096:
            raise _bad("rules description must be a string of at most 4096 characters")
        if len(self.renames) + len(self.shards) > MAX_RULES:
            raise _bad(f"{len(self.renames) + len(self.shards)} rules; at most {MAX_RULES}")
        for i, r in enumerate(self.renames):
            if not isinstance(r, (Pipeline, Tied)):
                raise _bad(f"renames[{i}] is a {type(r).__name__}, not Pipeline or Tied")
        for i, r in enumerate(self.shards):
            if not isinstance(r, tuple(_SHARD_KINDS.values())):
                raise _bad(f"shards[{i}] is a {type(r).__name__}, not a shard rule")

    def global_name(self, local_name: str, layout: Layout) -> str:
        """``local_name`` after every rename (raises ``RulesError`` if a rename fails)."""
        try:
            return self._rename(local_name, layout)
        except _Problem as e:
            raise RulesError([f"{local_name!r} at {_describe(layout)}: {e}"]) from None

    def _rename(self, name: str, layout: Layout) -> str:
        for rule in self.renames:
            new = rule.rename(name, layout)
            name = name if new is None else new
        return name

    def matching(self, global_name: str) -> list[tuple[int, ShardRule]]:
        """``(index, rule)`` of every shard rule whose pattern fullmatches ``global_name``."""
        return [(i, r) for i, r in enumerate(self.shards) if compiled_pattern(r.pattern).fullmatch(global_name)]

    def resolve(
        self,
        local: Mapping[str, tuple[int, ...]],
        layout: Layout,
        *,
        global_shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
    ) -> dict[str, TensorMapping]:
        """Map every local tensor of the rank at ``layout`` to global regions.

        Args:
            local: local name -> local shape, in state order (``ZeroFlat`` flattens in it).
            layout: the rank's layout.
            global_shapes: local name -> global shape, for tensors that know it (DTensors);
                ``Sharded`` rules need it.

        Returns:
            local name -> ``TensorMapping``.

        Raises:
            RulesError: listing every tensor no rule or several rules match, and every tensor
                whose shape does not fit its rule, each with the rank's coordinates.
        """
        hints = dict(global_shapes or {})
        where = _describe(layout)
        problems: list[str] = []
        out: dict[str, TensorMapping] = {}
        flats: list[tuple[_Ctx, ZeroFlat]] = []
        unmatched = 0
        for lname, raw in local.items():
            shape = _as_shape(raw)
            if shape is None:
                problems.append(f"{lname!r} at {where}: shape {raw!r} is not a tuple of integers >= 0")
                continue
            try:
                gname = self._rename(lname, layout)
            except _Problem as e:
                problems.append(f"{lname!r} at {where}: {e}")
                continue
            label = repr(lname) if gname == lname else f"{lname!r} (global name {gname!r})"
            hits = self.matching(gname)
            if len(hits) != 1:
                listed = "; ".join(f"shards[{i}] {r.describe()}" for i, r in hits)
                what = "no shard rule matches it" if not hits else f"{len(hits)} shard rules match it ({listed})"
                problems.append(f"{label} at {where}: {what}")
                unmatched += 1
                continue
            i, rule = hits[0]
            hint = hints.get(lname)
            ctx = _Ctx(lname, gname, shape, layout, f"{self.name}:shards[{i}]:{rule.kind}", None if hint is None else tuple(hint))
            if isinstance(rule, ZeroFlat):
                flats.append((ctx, rule))
                continue
            try:
                out[lname] = rule._map(ctx)
            except _Problem as e:
                problems.append(f"{label} at {where} [shards[{i}] {rule.describe()}]: {e}")
        flat_names = {ctx.local_name for ctx, _ in flats}
        for ctx, rule in flats:
            problems += self._resolve_flat(ctx, rule, local, out, flat_names, where)
        problems += _shape_conflicts(out, where)
        if problems:
            fix = [_FIX_MATCH] if unmatched else []
            fix += [_FIX_FIT] if len(problems) > unmatched else []
            fix.append("See docs/layouts.md.")
            raise RulesError(problems, where=f"resolving rules {self.name!r} at {where}", fix=" ".join(fix))
        return {name: out[name] for name in local}

    def _resolve_flat(self, ctx: _Ctx, rule: ZeroFlat, local: Mapping, out: dict, flat_names: set, where: str) -> list[str]:
        label = f"{ctx.local_name!r} at {where} [{ctx.rule} {rule.pattern!r}]"
        params, missing = [], []
        for name in local:
            if name == ctx.local_name or not rule.selects(name):
                continue
            if name in flat_names:
                return [f"{label}: its params select {name!r}, which is itself a zero_flat tensor"]
            if name not in out:
                missing.append(name)
            params.append(out.get(name))
        if missing:
            return [f"{label}: cannot place it while its params {missing} have problems (listed here)"]
        try:
            out[ctx.local_name] = rule._map_flat(ctx, params)
        except _Problem as e:
            return [f"{label}: {e}"]
        return []

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain JSON (placeholders already substituted); ``from_json`` reads it back."""
        return {
            "format": RULES_FORMAT,
            "version": RULES_VERSION,
            "name": self.name,
            "description": self.description,
            "renames": [r.to_json() for r in self.renames],
            "shards": [r.to_json() for r in self.shards],
        }

    @classmethod
    def from_json(cls, obj: Any, params: Optional[Mapping[str, Any]] = None) -> "Rules":
        """Validate untrusted rules JSON, substituting ``${name}`` placeholders from ``params``.

        Raises:
            RulesError: naming the field path of the first problem.
        """
        if not isinstance(obj, dict):
            raise _bad(f"rules must be a JSON object, got {type(obj).__name__}")
        allowed = {"format", "version", "name", "description", "parameters", "renames", "shards"}
        extra = sorted(set(map(str, obj)) - allowed)
        if extra:
            raise _bad(f"rules: unknown field(s) {extra}; allowed {sorted(allowed)}")
        if obj.get("format") != RULES_FORMAT or type(obj.get("version")) is not int:
            raise _bad(f"rules: 'format' must be {RULES_FORMAT!r} and 'version' an integer")
        if obj["version"] != RULES_VERSION:
            raise _bad(f"rules: version {obj['version']} is not supported (this reader knows {RULES_VERSION})")
        values = _parameter_values(obj.get("parameters", {}), dict(params or {}))
        lists = {}
        for key, kinds in (("renames", _RENAME_KINDS), ("shards", _SHARD_KINDS)):
            items = obj.get(key, [])
            if not isinstance(items, list) or len(items) > MAX_RULES:
                raise _bad(f"rules.{key} must be a list of at most {MAX_RULES} rules")
            try:
                lists[key] = tuple(_rule_from_json(item, kinds, f"{key}[{i}]", values) for i, item in enumerate(items))
            except RecursionError:
                raise _bad(f"rules.{key}: nested too deeply") from None
        try:
            return cls(lists["renames"], lists["shards"], obj.get("name", "custom"), obj.get("description", ""))
        except RulesError as e:
            raise _bad(f"rules: {e.problems[0]}") from None


def _shape_conflicts(out: Mapping[str, TensorMapping], where: str) -> list[str]:
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    problems = []
    for m in out.values():
        for name, shape in m.global_shapes.items():
            prev = seen.setdefault(name, (shape, m.local_name))
            if prev[0] != shape:
                problems.append(
                    f"global tensor {name!r} at {where}: {prev[1]!r} gives it shape {prev[0]} but {m.local_name!r} gives {shape}"
                )
    return problems


def _parameter_values(declared: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Declared parameters (``{name: {"default": v, "doc": s}}``) merged with ``given``."""
    if not isinstance(declared, dict) or len(declared) > 256:
        raise _bad("rules.parameters must be an object {name: {'default': value, 'doc': text}}")
    values, missing = {}, []
    for name, spec in declared.items():
        if not isinstance(name, str) or not _PLACEHOLDER.fullmatch("${" + name + "}"):
            raise _bad(f"rules.parameters: {name!r} is not a valid parameter name")
        if not isinstance(spec, dict) or not set(spec) <= {"default", "doc"}:
            raise _bad(f"rules.parameters.{name} must be an object with 'default' and/or 'doc'")
        if name in given:
            values[name] = _as_param(given[name], name)
        elif "default" in spec:
            values[name] = _as_param(spec["default"], name)
        else:
            missing.append(name)
    unknown = sorted(set(given) - set(declared))
    if missing or unknown:
        parts = ([f"missing required parameter(s) {missing}"] if missing else []) + (
            [f"unknown parameter(s) {unknown}"] if unknown else []
        )
        raise _bad(f"rules parameters: {'; '.join(parts)}; declared: {sorted(declared)}")
    return values


def _as_param(value: Any, name: str) -> Any:
    if value is None or isinstance(value, str) or (type(value) is int and abs(value) <= MAX_INT):
        return value
    if isinstance(value, (list, tuple)) and len(value) <= 1 << 16 and all(type(v) is int for v in value):
        return list(value)
    raise _bad(f"parameter {name!r} must be null, a string, an integer or a list of integers, got {value!r}")


def _substitute(value: Any, values: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, values, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    for name in _PLACEHOLDER.findall(value):
        if name not in values:
            raise _bad(f"{where}: placeholder ${{{name}}} names no declared parameter")
    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return values[whole.group(1)]

    def text(m: "re.Match[str]") -> str:
        v = values[m.group(1)]
        if not isinstance(v, (str, int)):
            raise _bad(f"{where}: parameter {m.group(1)!r} = {v!r} cannot be inserted into text")
        return str(v)

    return _PLACEHOLDER.sub(text, value)


def _rule_from_json(item: Any, kinds: Mapping[str, type], where: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
        raise _bad(f"{where}: must be an object with a 'kind'")
    cls = kinds.get(item["kind"])
    if cls is None:
        raise _bad(f"{where}: unknown kind {item['kind']!r}; expected one of {sorted(kinds)}")
    names = {f.name for f in fields(cls)}
    extra = sorted(set(map(str, item)) - names - {"kind"})
    if extra:
        raise _bad(f"{where} ({item['kind']}): unknown field(s) {extra}; allowed {sorted(names)}")
    args = {k: _as_tuple(_substitute(v, values, f"{where}.{k}")) for k, v in item.items() if k != "kind"}
    try:
        return cls(**args)
    except RulesError as e:
        raise _bad(f"{where} ({item['kind']}): {e.problems[0]}") from None
    except TypeError as e:
        raise _bad(f"{where} ({item['kind']}): {e}") from None


# -- loading -------------------------------------------------------------------------------------


def shipped_rules() -> tuple[str, ...]:
    """Names of the rule sets shipped in ``ckpt/rules_data``."""
    folder = resources.files("ckpt") / "rules_data"
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")))


def _parse_text(text: str, where: str, yaml_file: bool) -> Any:
    try:
        if yaml_file:
            try:
                import yaml
            except ImportError:
                raise _bad(f"{where}: reading YAML rules needs PyYAML (pip install pyyaml); or use JSON") from None
            return yaml.safe_load(text)

        def no_constant(c: str) -> Any:
            raise ValueError(f"{c} is not valid JSON")

        return json.loads(text, parse_constant=no_constant)
    except RulesError:
        raise
    except Exception as e:  # json: ValueError, RecursionError; yaml: yaml.YAMLError
        raise _bad(f"{where}: not valid {'YAML' if yaml_file else 'JSON'}: {type(e).__name__}: {e}") from None


def load_rules(name_or_path: Union[str, Path], **params: Any) -> Rules:
    """A shipped rule set (``"megatron_gpt"``, ``"ddp"``, ``"fsdp"``) or a JSON/YAML rules file.

    Args:
        name_or_path: a shipped name, or a path ending in ``.json``, ``.yaml`` or ``.yml``.
        **params: values for the file's ``${name}`` placeholders (e.g. ``vocab_size=50257``).

    Raises:
        RulesError: unknown name, unreadable or oversized file, invalid rules, missing or
            unknown parameters.
    """
    text_name = str(name_or_path)
    if isinstance(name_or_path, str) and re.fullmatch(r"[a-z0-9_]+", name_or_path):
        if name_or_path not in shipped_rules():
            raise _bad(f"no shipped rules named {name_or_path!r}; shipped: {list(shipped_rules())}, or pass a file path")
        data = (resources.files("ckpt") / "rules_data" / f"{name_or_path}.json").read_bytes()
    else:
        path = Path(name_or_path)
        try:
            size = path.stat().st_size
            if size > MAX_RULES_BYTES:
                raise _bad(f"rules file {text_name!r} has {size} bytes; at most {MAX_RULES_BYTES}")
            data = path.read_bytes()
        except OSError as e:
            raise _bad(f"cannot read rules file {text_name!r}: {e}") from None
    if len(data) > MAX_RULES_BYTES:
        raise _bad(f"rules {text_name!r} have {len(data)} bytes; at most {MAX_RULES_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"rules {text_name!r} are not UTF-8: {e}") from None
    obj = _parse_text(text, text_name, text_name.endswith((".yaml", ".yml")))
    try:
        return Rules.from_json(obj, params)
    except RulesError as e:
        raise RulesError(e.problems, where=f"in rules {text_name!r}") from None

