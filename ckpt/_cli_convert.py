"""The ``convert`` and ``diff`` commands, and ``inspect``/``verify`` of formats other than ours.

Imported by ``ckpt.cli`` without torch; torch loads when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Optional

from ckpt.formats import FORMATS, FormatError, UnknownFormatError, detect_format

__all__ = ["add_commands", "foreign_format", "cmd_foreign_inspect", "cmd_foreign_verify"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT = 0, 1, 2, 3


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class _Bar:
    """A one-line progress bar with bytes and rate on stderr, drawn only on a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.on = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.perf_counter()
        if not self.on or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        rate = done / max(now - self.started, 1e-9)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {_human(done)} / {_human(total)} {_human(rate)}/s  {name[-40:]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.on and self.last:
            sys.stderr.write("\n")


def foreign_format(url: str, fmt: Optional[str], opts: Optional[dict[str, Any]]) -> Optional[str]:
    """The format of ``url`` when it is not ours; None for universal (or nothing there yet).

    A path that does not exist is left to the universal code path ("no committed checkpoint").
    """
    if fmt:
        return None if fmt == "universal" else fmt
    try:
        found = detect_format(url, storage_options=_opts(url, opts))
    except UnknownFormatError as e:
        if "does not exist" in str(e):
            return None
        raise
    return None if found == "universal" else found


def _opts(url: str, opts: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return None if "://" not in url or url.lower().startswith("file://") else opts


def _open(args: argparse.Namespace, fmt: str, opts: Optional[dict[str, Any]]) -> Any:
    from ckpt.formats import open_reader

    return open_reader(args.url, format=fmt, storage_options=_opts(args.url, opts))


def _summary(reader: Any, *, tensors: bool) -> dict[str, Any]:
    infos = reader.tensors()
    dtypes: dict[str, int] = {}
    for i in infos:
        dtypes[i.dtype] = dtypes.get(i.dtype, 0) + 1
    out: dict[str, Any] = {
        "url": reader.url,
        "format": reader.format,
        "tensor_count": len(infos),
        "logical_bytes": sum(i.nbytes for i in infos),
        "dtypes": dtypes,
        "checksums": reader.format == "universal",
        "plain": reader.plain_state(),
        "details": reader.describe(),
        "warnings": reader.warnings(),
    }
    if tensors:
        out["tensors"] = {i.name: i.to_json() for i in infos}
    return out


def cmd_foreign_inspect(args: argparse.Namespace, fmt: str, opts: Optional[dict[str, Any]]) -> int:
    with _open(args, fmt, opts) as reader:
        info = _summary(reader, tensors=True)
    if args.json:
        _out(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    _out(f"checkpoint {info['url']}  format {info['format']}")
    _out(f"  {info['tensor_count']} tensors, {_human(info['logical_bytes'])}; dtypes: "
         + ", ".join(f"{d} ({n})" for d, n in sorted(info["dtypes"].items())))
    _out("  checksums: none in this format (ckpt verify checks structure and readability only)")
    if info["plain"]:
        _out(f"  non-tensor keys: {', '.join(sorted(info['plain']))}")
    for k, v in info["details"].items():
        _out(f"  {k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}")
    for w in info["warnings"]:
        _out(f"  warning: {w}")
    width = max((len(n) for n in info["tensors"]), default=10)
    for name, t in info["tensors"].items():
        _out(f"    {name:<{width}}  {t['dtype']:<14} {str(t['shape']):<20} {_human(t['bytes']):>10}")
    return EXIT_OK


def cmd_foreign_verify(args: argparse.Namespace, fmt: str, opts: Optional[dict[str, Any]]) -> int:
    try:
        with _open(args, fmt, opts) as reader:
            report = reader.check(threads=args.threads)
    except FormatError as e:
        if args.json:
            _out(json.dumps({"url": args.url, "format": fmt, "ok": False, "checksums": False, "error": str(e)}, indent=2))
        else:
            _out(f"{args.url} ({fmt}): BROKEN: {e}")
        return EXIT_CORRUPT
    if args.json:
        _out(json.dumps({"url": args.url, "format": fmt, "ok": report.ok, "checksums": report.checksums, "tensors": report.tensors,
                         "bytes_checked": report.bytes_checked, "problems": list(report.problems)}, indent=2))
        return EXIT_OK if report.ok else EXIT_CORRUPT
    note = "" if report.checksums else " (this format has no checksums: structure and readability checked, not bit flips)"
    if report.ok:
        _out(f"{args.url} ({fmt}): OK, {report.tensors} tensors, {_human(report.bytes_checked)} read{note}")
        return EXIT_OK
    _out(f"{args.url} ({fmt}): BROKEN, {len(report.problems)} problem(s){note}:")
    for p in report.problems:
        _out(f"  {p}")
    return EXIT_CORRUPT


# --------------------------------------------------------------------------------------------
# convert / diff
# --------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace, opts: Optional[dict[str, Any]], usage: Callable[[str], Exception]) -> int:
    from ckpt.convert import FLOAT_DTYPES, convert
    from ckpt.formats.hf import parse_size

    if args.dtype and args.dtype not in FLOAT_DTYPES:
        raise usage(f"--dtype {args.dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")
    if (args.layout is None) != (args.rules is None):
        raise usage("--layout and --rules go together (e.g. --layout tp=2,pp=2,dp=2 --rules megatron_gpt.json)")
    try:
        shard = parse_size(args.max_shard_size) if args.max_shard_size else None
        layout, rules = None, None
        if args.layout:
            from ckpt.formats._layout import parse_layout_text

            layout = parse_layout_text(args.layout)
            rules = _rules(args.rules, args.rule_param or ())
    except ValueError as e:
        raise usage(str(e)) from None
    bar = _Bar("converting")
    try:
        report = convert(
            args.src, args.dst, src_format=args.src_format, dst_format=args.dst_format, dtype=args.dtype, dry_run=args.dry_run,
            layout=layout, rules=rules, step=args.step, src_step=args.src_step, max_shard_size=shard,
            storage_options=opts, progress=None if args.json else bar, io_threads=args.threads,
        )
    finally:
        bar.close()
    if args.json:
        _out(json.dumps(report.to_json(), indent=2, default=str))
        return EXIT_OK
    for w in report.warnings:
        sys.stderr.write(f"ckpt convert: warning: {w}\n")
    if report.dry_run:
        _out(f"dry run: {report.src} ({report.src_format}) -> {report.dst} ({report.dst_format}): {report.tensors} tensors, "
             f"{_human(report.bytes_in)} -> {_human(report.bytes_out)}; plan {json.dumps(dict(report.plan), default=str)}")
        return EXIT_OK
    rate = report.bytes_in / report.seconds if report.seconds else 0.0
    _out(f"converted {report.src} ({report.src_format}) -> {report.committed} ({report.dst_format}): {report.tensors} tensors, "
         f"{_human(report.bytes_out)} in {report.seconds:.1f} s ({_human(rate)}/s)")
    return EXIT_OK


def _rules(name: str, params: Any) -> Any:
    """``--rules NAME|FILE`` with ``--rule-param KEY=VALUE`` values (JSON where they parse)."""
    from ckpt.rules import load_rules

    values: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--rule-param {item!r} must look like KEY=VALUE")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return load_rules(name, **values)


def cmd_diff(args: argparse.Namespace, opts: Optional[dict[str, Any]]) -> int:
    from ckpt.convert import diff

    bar = _Bar("comparing")
    try:
        report = diff(args.a, args.b, a_format=args.a_format, b_format=args.b_format, storage_options=opts,
                      io_threads=args.threads, progress=None if args.json else bar)
    finally:
        bar.close()
    code = EXIT_OK if report.equal else 1
    if args.json:
        _out(json.dumps(report.to_json(), indent=2))
        return code
    for t in report.tensors:
        if t.status == "equal":
            if args.all:
                _out(f"  equal      {t.name}")
        elif t.status == "different":
            worst = "" if t.max_abs_diff is None else f", max |a-b| = {t.max_abs_diff:.6g}"
            _out(f"  different  {t.name}: {t.differing} element(s){worst}")
        elif t.status == "mismatch":
            _out(f"  mismatch   {t.name}: {t.detail}")
        else:
            _out(f"  {'only in A' if t.status == 'only_a' else 'only in B'}  {t.name}")
    for key, status in report.plain:
        _out(f"  {status:<10} non-tensor value {key!r}")
    same = sum(t.status == "equal" for t in report.tensors)
    _out(f"{'EQUAL' if report.equal else 'DIFFERENT'}: {same} of {len(report.tensors)} tensors bit-identical "
         f"({report.a_format} {report.a} vs {report.b_format} {report.b})")
    return code


def add_commands(sub: Any, storage: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``convert`` and ``diff`` (``storage`` adds the shared store options)."""
    conv = sub.add_parser("convert", help="convert between formats, streaming (universal, dcp, torch, safetensors, hf)")
    conv.add_argument("src", help="source checkpoint: path or fsspec URL")
    conv.add_argument("dst", help="destination: path or fsspec URL (must not hold a checkpoint yet)")
    conv.add_argument("--from", dest="src_format", choices=FORMATS, help="source format (default: detected)")
    conv.add_argument("--to", dest="dst_format", choices=FORMATS, help="destination format (default: from DST's name)")
    conv.add_argument("--dtype", help="cast floating-point tensors (bfloat16, float16, float32, float64)")
    conv.add_argument("--layout", help="universal output cut for this layout, e.g. tp=2,pp=2,dp=2 (needs --rules)")
    conv.add_argument("--rules", help="sharding rules for --layout: a shipped name or a rules file")
    conv.add_argument("--rule-param", action="append", metavar="KEY=VALUE",
                      help="a value for the rules' parameters, e.g. vocab_size=50257 (repeatable)")
    conv.add_argument("--step", type=int, help="universal output: step to write (default: the source's, else 0)")
    conv.add_argument("--src-step", type=int, help="universal input: step to read (default: latest)")
    conv.add_argument("--max-shard-size", help="hf output: bytes per shard, e.g. 5GB (default), 500MB")
    conv.add_argument("--threads", type=int, default=2, help="reads ahead of the writer (default 2)")
    conv.add_argument("--dry-run", action="store_true", help="plan only: read metadata, write nothing")
    storage(conv)
    conv.set_defaults(func="convert")

    d = sub.add_parser("diff", help="compare two checkpoints of any formats tensor by tensor (exit 0 equal, 1 different)")
    d.add_argument("a", help="first checkpoint")
    d.add_argument("b", help="second checkpoint")
    d.add_argument("--from-a", dest="a_format", choices=FORMATS, help="format of A (default: detected)")
    d.add_argument("--from-b", dest="b_format", choices=FORMATS, help="format of B (default: detected)")
    d.add_argument("--all", action="store_true", help="list equal tensors too")
    d.add_argument("--threads", type=int, default=2, help="reads ahead (default 2)")
    storage(d)
    d.set_defaults(func="diff")
