"""The package's layer rule (CONTRIBUTING.md): each sub-package imports only from the layers below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dae"

#: modules below every layer: any sub-package may import them
BASE = {"errors"}

#: sub-package -> the sub-packages it may import from (besides itself and BASE)
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "data": {"utils"},
    "disruptions": {"utils"},
    "losses": {"utils"},
    "models": {"utils", "disruptions"},
    "engine": {"utils", "data", "disruptions", "losses", "models"},
    "evaluation": {"utils", "data", "models", "engine"},
    "bundle": {"utils"},
    "logsam": {"utils", "data", "models", "engine", "evaluation"},
    "cli": {"utils", "data", "disruptions", "losses", "models", "engine", "evaluation"},
}


def _imported_subpackages(path: Path) -> set[str]:
    """The ``dae.<x>`` sub-packages a module imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("dae.") and name.count(".") >= 1}
    return found


def test_every_subpackage_has_a_layer() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(ALLOWED), "add the new sub-package to ALLOWED and to CONTRIBUTING.md"


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_imports_follow_the_layers(subpackage: str) -> None:
    offending = {}
    for module in sorted((PACKAGE / subpackage).rglob("*.py")):
        bad = _imported_subpackages(module) - ALLOWED[subpackage] - BASE - {subpackage}
        if bad:
            offending[str(module.relative_to(PACKAGE.parent))] = sorted(bad)
    assert not offending, f"imports across the layer rule: {offending}"


def test_importing_the_engine_does_not_load_evaluation() -> None:
    code = "import sys, dae.engine; print(sorted(m for m in sys.modules if m.startswith('dae.evaluation')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
