"""The ``ckpt`` command line: list, inspect, verify, convert and diff checkpoints.

Exit codes: 0 ok, 1 operational error (missing checkpoint, unreadable store, bad manifest),
2 usage error, 3 verification failed (``diff``: 0 equal, 1 different). Every error is one line
on stderr saying what and where. This module imports no torch; ``convert``/``diff`` and the
commands on other formats (``ckpt._cli_convert``) load it when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from ckpt import _api, _cli_convert, _commit
from ckpt.errors import CheckpointError, ManifestError
from ckpt.metadata import Manifest
from ckpt.store import open_store

__all__ = ["main", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_CORRUPT"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT = 0, 1, 2, 3


class _UsageError(Exception):
    pass


def _storage_options(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    opts: dict[str, Any] = {}
    for item in args.storage_option or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"--storage-option {item!r} must look like KEY=VALUE")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    if args.endpoint_url:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    return opts or None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args.url, storage_options=_storage_options(args))
    saves = _commit.latest_saves(_commit.list_saves(store))
    rows = []
    for step in sorted(saves):
        ref = saves[step]
        row: dict[str, Any] = {"step": step, "save_id": ref.save_id, "manifest": ref.manifest_key}
        if args.long or args.json:
            try:
                m = _commit.read_manifest(store, ref)
                row.update(created=_when(m.created_unix_ns), world_size=m.world_size, tensors=len(m.tensors),
                           logical_bytes=m.nbytes, stored_bytes=m.stored_bytes)
            except CheckpointError as e:
                row["error"] = str(e).splitlines()[0]
        rows.append(row)
    if args.json:
        _out(json.dumps({"url": store.url, "steps": rows}, indent=2))
        return EXIT_OK
    if not rows:
        _out(f"no committed steps under {store.url}")
        return EXIT_OK
    for r in rows:
        if "error" in r:
            _out(f"{r['step']:>12}  {r['save_id']}  UNREADABLE: {r['error']}")
        elif args.long:
            _out(f"{r['step']:>12}  {r['save_id']}  {r['created']}  ranks={r['world_size']:<4} "
                 f"tensors={r['tensors']:<6} {_human(r['logical_bytes']):>10} ({_human(r['stored_bytes'])} stored)")
        else:
            _out(f"{r['step']}")
    return EXIT_OK


def _manifest_summary(store_url: str, m: Manifest, *, tensors: bool) -> dict[str, Any]:
    codecs = sorted({c.get("name", "?") for t in m.tensors.values() for ch in t.chunks for c in ch.codecs})
    checks = sorted({ch.checksum.algorithm for t in m.tensors.values() for ch in t.chunks})
    out: dict[str, Any] = {
        "url": store_url,
        "step": m.step,
        "save_id": m.save_id,
        "format_version": m.format_version,
        "created": _when(m.created_unix_ns),
        "world_size": m.world_size,
        "writer": dict(m.writer),
        "layout": m.layout,
        "tensor_count": len(m.tensors),
        "chunk_count": sum(len(t.chunks) for t in m.tensors.values()),
        "object_count": len(m.objects()),
        "logical_bytes": m.nbytes,
        "stored_bytes": m.stored_bytes,
        "compression_ratio": round(m.nbytes / m.stored_bytes, 4) if m.stored_bytes else None,
        "codecs": codecs,
        "checksums": checks,
        "extras": dict(m.extras),
        "state_keys": [_top_keys(tree) for tree in m.ranks],
    }
    if tensors:
        out["tensors"] = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "chunks": len(t.chunks),
                   "stored_bytes": sum(c.byte_length for c in t.chunks)}
            for name, t in sorted(m.tensors.items())
        }
    return out


def _top_keys(tree: Any) -> list[str]:
    if isinstance(tree, dict) and "$dict" in tree:
        return [str(k) for k, _ in tree["$dict"]]
    return []


def cmd_inspect(args: argparse.Namespace) -> int:
    fmt = _cli_convert.foreign_format(args.url, args.format, _storage_options(args))
    if fmt is not None:
        if args.step is not None:
            raise _UsageError(f"--step applies to universal checkpoints, not {fmt}")
        return _cli_convert.cmd_foreign_inspect(args, fmt, _storage_options(args))
    store, m = _api.open_manifest(args.url, step=args.step, storage_options=_storage_options(args))
    info = _manifest_summary(store.url, m, tensors=True)
    if args.json:
        _out(json.dumps(info, indent=2, sort_keys=False))
        return EXIT_OK
    _out(f"checkpoint {info['url']}  step {m.step}  save {m.save_id}")
    _out(f"  format v{m.format_version}, written {info['created']} by {m.world_size} rank(s) "
         f"({', '.join(f'{k} {v}' for k, v in m.writer.items())})")
    ratio = info["compression_ratio"]
    _out(f"  {info['tensor_count']} tensors in {info['chunk_count']} chunks, {info['object_count']} objects; "
         f"{_human(m.nbytes)} logical, {_human(m.stored_bytes)} stored"
         + (f" (ratio {ratio:.2f})" if ratio else ""))
    _out(f"  codecs: {', '.join(info['codecs']) or 'none'}; checksums: {', '.join(info['checksums']) or 'none'}")
    _out(f"  layout: {json.dumps(m.layout) if m.layout else 'none recorded'}")
    if m.extras:
        _out(f"  extras: {json.dumps(dict(m.extras), sort_keys=True)}")
    _out(f"  state keys (rank 0): {', '.join(info['state_keys'][0]) if info['state_keys'] else ''}")
    width = max((len(n) for n in info["tensors"]), default=10)
    for name, t in info["tensors"].items():
        _out(f"    {name:<{width}}  {t['dtype']:<14} {str(t['shape']):<20} {_human(t['bytes']):>10}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    opts = _storage_options(args)
    fmt = _cli_convert.foreign_format(args.url, args.format, opts)
    if fmt is not None:
        if args.step is not None or args.all:
            raise _UsageError(f"--step/--all apply to universal checkpoints, not {fmt}")
        return _cli_convert.cmd_foreign_verify(args, fmt, opts)
    store = open_store(args.url, storage_options=opts)
    if args.all:
        steps = sorted(_commit.latest_saves(_commit.list_saves(store)))
        if not steps:
            raise CheckpointError(f"{store.url}: no committed steps to verify")
    else:
        steps = [args.step]
    reports, worst = [], EXIT_OK
    for step in steps:
        try:
            report = _api.verify(store, step=step, threads=args.threads)
        except CheckpointError as e:
            if not (args.all or isinstance(e, ManifestError)):
                raise  # e.g. nothing committed: an operational error, exit 1
            reports.append({"step": step, "ok": False, "error": str(e).splitlines()[0]})
            worst = EXIT_CORRUPT
            continue
        bad = [{"tensor": f.tensor, "object": f.object, "byte_offset": f.byte_offset,
                "byte_length": f.byte_length, "reason": f.reason} for f in report.failures]
        reports.append({"step": report.step, "save_id": report.save_id, "ok": report.ok, "chunks": report.chunks,
                        "bytes_checked": report.bytes_checked, "corrupt": bad})
        if not report.ok:
            worst = EXIT_CORRUPT
    if args.json:
        _out(json.dumps({"url": store.url, "ok": worst == EXIT_OK, "steps": reports}, indent=2))
        return worst
    for r in reports:
        if "error" in r:
            _out(f"step {r['step']}: CORRUPT: {r['error']}")
        elif r["ok"]:
            _out(f"step {r['step']} (save {r['save_id']}): OK, {r['chunks']} chunks, {_human(r['bytes_checked'])} verified")
        else:
            _out(f"step {r['step']} (save {r['save_id']}): CORRUPT, {len(r['corrupt'])} of {r['chunks']} chunks bad:")
            for f in r["corrupt"]:
                _out(f"  tensor {f['tensor']!r}: object {f['object']} bytes [{f['byte_offset']}, "
                     f"{f['byte_offset'] + f['byte_length']}): {f['reason']}")
    return worst


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ckpt", description="List, inspect, verify, convert and compare checkpoints (local paths, s3://, any fsspec URL).")
    from ckpt import __version__

    p.add_argument("--version", action="version", version=f"ckpt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def storage(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option (VALUE parsed as JSON when it is JSON); repeatable")
        sp.add_argument("--endpoint-url", help="S3-compatible endpoint (e.g. http://127.0.0.1:9000)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("url", help="checkpoint root: a path, file://, s3://bucket/prefix or another fsspec URL")
        storage(sp)

    def any_format(sp: argparse.ArgumentParser) -> None:
        from ckpt.formats import FORMATS

        sp.add_argument("--from", dest="format", choices=FORMATS,
                        help="the checkpoint's format (default: detected; universal is ckpt's own)")

    ls = sub.add_parser("ls", help="list committed steps")
    common(ls)
    ls.add_argument("-l", "--long", action="store_true", help="read each manifest: time, ranks, sizes")
    ls.set_defaults(func=cmd_ls)

    ins = sub.add_parser("inspect", help="show a checkpoint of any format: tensors, sizes, codecs, layout, extras")
    common(ins)
    any_format(ins)
    ins.add_argument("--step", type=int, help="step to show (default: latest committed)")
    ins.set_defaults(func=cmd_inspect)

    ver = sub.add_parser("verify", help="read every chunk and check its checksum (exit 3 if corrupt); other formats: structure")
    common(ver)
    any_format(ver)
    g = ver.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, help="step to verify (default: latest committed)")
    g.add_argument("--all", action="store_true", help="verify every committed step")
    ver.add_argument("--threads", type=int, default=4, help="parallel reads (default 4)")
    ver.set_defaults(func=cmd_verify)
    _cli_convert.add_commands(sub, storage)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.func == "convert":
            return _cli_convert.cmd_convert(args, _storage_options(args), _UsageError)
        if args.func == "diff":
            return _cli_convert.cmd_diff(args, _storage_options(args))
        return int(args.func(args))
    except _UsageError as e:
        sys.stderr.write(f"ckpt: error: {e}\n")
        return EXIT_USAGE
    except CheckpointError as e:
        sys.stderr.write(f"ckpt {args.command}: error: {e}\n")
        return EXIT_ERROR
    except (OSError, ValueError) as e:
        sys.stderr.write(f"ckpt {args.command}: error: {type(e).__name__}: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("ckpt: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
