"""The package import direction is ckpt <- recovery <- agents, and light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: package -> packages it must never import
FORBIDDEN = {"ckpt": {"recovery", "agents"}, "recovery": {"agents"}, "agents": set()}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_import_against_the_direction() -> None:
    bad = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"package {package} has no modules"
        for path in files:
            for line, module in _imports(path):
                if module.split(".")[0] in forbidden:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "imports against ckpt <- recovery <- agents:\n" + "\n".join(bad)


def test_proto_is_not_a_python_package() -> None:
    assert not (ROOT / "proto" / "__init__.py").exists()


@pytest.mark.parametrize("module", ["ckpt", "ckpt.metadata", "ckpt.errors", "ckpt.store", "ckpt.codecs", "ckpt.cli", "recovery"])
def test_light_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"importing {module} pulled in torch (or failed): {proc.stderr[-2000:]}"
