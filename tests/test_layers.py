"""Layering rule of DESIGN.md: a module never imports a module of a higher layer (AST walk over src/)."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "losskit"

# Lowest first (DESIGN.md). `bench` is imported only by cli, so it sits just below cli.
LAYERS = [
    "contract",
    "functional",
    "kernels",
    "modifiers",
    "hooks",
    "losses",
    "registry",
    "combined",
    "config",
    "train",
    "service",
    "client",
    "bench",
    "cli",
]


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside losskit (None for non-losskit modules)."""
    parts = module.split(".")
    if parts[0] != "losskit":
        return None
    if len(parts) == 1:
        return "__init__"
    head = parts[1]
    if head == "__main__":
        return "cli"
    return head


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append(mod)
            # `from losskit import kernels` imports the layer named by the alias.
            if mod == "losskit":
                found += [
                    f"losskit.{a.name}"
                    for a in node.names
                    if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file()
                ]
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_layer_is_known():
    unknown = {
        layer_of(module_name(p))
        for p in SOURCES
        if layer_of(module_name(p)) not in LAYERS + ["__init__"]
    }
    assert not unknown, f"modules outside the layer table of DESIGN.md: {unknown}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_imports(path):
    own = layer_of(module_name(path))
    if own == "__init__":
        return  # the package root re-exports the contract only (checked below)
    rank = LAYERS.index(own)
    for mod in imported_modules(path):
        other = layer_of(mod)
        if other is None or other == "__init__":
            continue
        assert LAYERS.index(other) <= rank, f"{path.relative_to(SRC)} ({own}) imports {mod} ({other})"


def test_functional_never_imports_kernels():
    for path in (SRC / "functional").rglob("*.py"):
        for mod in imported_modules(path):
            assert not mod.startswith("losskit.kernels"), f"{path} imports {mod}"


def test_package_root_imports_only_the_contract():
    mods = [m for m in imported_modules(SRC / "__init__.py") if m.startswith("losskit")]
    assert all(m == "losskit.contract" for m in mods), mods
