"""The package's shape: stages use each other's public names only, and the store package stays readable."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "spectral_analyzer"


def _package_of(module: str) -> str:
    """``spectral_analyzer.store.core`` -> ``spectral_analyzer.store``; top-level modules are their own package."""
    parts = module.split(".")
    path = ROOT.joinpath(*parts)
    return ".".join(parts if path.is_dir() else parts[:-1]) if len(parts) > 1 else module


def _modules():
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def _resolve(module: str, node: ast.ImportFrom, is_init: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_init else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_private_name_is_imported_across_packages():
    crossings = []
    for module, path in _modules():
        here = _package_of(module) if path.name != "__init__.py" else module
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _resolve(module, node, path.name == "__init__.py")
            if not source.startswith(("spectral_analyzer", "cli")):
                continue
            there = source if (ROOT.joinpath(*source.split("."))).is_dir() else _package_of(source)
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            private += [p for p in source.split(".") if p.startswith("_") and p not in ("__init__", "_version")]
            if private and there != here:
                crossings.append(f"{module} imports {private} from {source}")
    assert not crossings, "\n".join(crossings)


def test_store_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "store").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes
