#!/usr/bin/env python
"""Generate the Python code of the coordinator protocol into ``recovery/_proto/``.

Usage (from the repository root, with ``grpcio-tools`` installed, e.g. ``pip install -e '.[test]'``)::

    python scripts/gen_proto.py              # regenerate recovery/_proto/
    python scripts/gen_proto.py --out DIR    # generate into DIR (the freshness test does this)

protoc runs with ``proto/`` as the include root so descriptors keep their full path
(``ckpt/coordinator/v1/coordinator.proto``); the files are then flattened into one folder and
the generated absolute import (``from ckpt.coordinator.v1 import coordinator_pb2``) is rewritten
to a relative one so the code works as the subpackage ``recovery._proto``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTOS = ["ckpt/coordinator/v1/coordinator.proto", "grpc/health/v1/health.proto"]
DEFAULT_OUT = ROOT / "recovery" / "_proto"
INIT = '"""Generated protobuf and gRPC code (scripts/gen_proto.py); do not edit."""\n'
_ABS_IMPORT = re.compile(r"^from (?:ckpt\.coordinator\.v1|grpc\.health\.v1) import (\w+) as (\w+)$", re.M)


def generate(out: Path) -> list[Path]:
    """Run protoc and write the flattened, import-fixed modules into ``out``; return them."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
               f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            text = _ABS_IMPORT.sub(r"from . import \1 as \2", src.read_text())
            dst = out / src.name
            dst.write_text(text)
            written.append(dst)
    (out / "__init__.py").write_text(INIT)
    return [out / "__init__.py", *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default recovery/_proto)")
    args = parser.parse_args(argv)
    if args.out == DEFAULT_OUT and DEFAULT_OUT.exists():
        shutil.rmtree(DEFAULT_OUT)
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out.parent in path.parents else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
