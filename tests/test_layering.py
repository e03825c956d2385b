"""Dependencies point one way: app -> indexes -> moco."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"moco": {"indexes", "app", "launch"}, "indexes": {"app", "launch"}, "app": {"launch"}}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files
    }
    assert not {f: b for f, b in bad.items() if b}


def test_detector_sees_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import indexes.store\nfrom app import ui\nfrom . import sibling\n")
    assert imported_packages(f) == {"indexes", "app"}


def moco_modules_imported(path: Path) -> set[str]:
    """The ``moco.<module>`` names a file imports (``from moco import x`` is the public API)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moco.")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("moco.")
        ):
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", ["indexes", "app"])
def test_other_packages_use_only_mocos_public_api(package: str) -> None:
    """``moco/__init__`` exports what the others need; nobody reaches into its modules."""
    files = sorted((ROOT / package).rglob("*.py"))
    deep = {str(f.relative_to(ROOT)): sorted(moco_modules_imported(f)) for f in files}
    assert not {f: m for f, m in deep.items() if m}


def test_classification_sits_above_the_collection() -> None:
    """``indexes.classify`` builds on ``Collection``; the collection knows nothing of probes."""
    for name in ("collection", "store", "vectors", "build", "duplicates"):
        tree = ast.parse((ROOT / "indexes" / f"{name}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "indexes.classify" not in names, name
