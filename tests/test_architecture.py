"""The package structure of DESIGN.md section 4, enforced: one-way dependencies and no private reach-ins.

- ``lint-imports`` checks the contracts in pyproject.toml ``[tool.importlinter]``: the layers
  ``integrations -> gsa_plugins -> gsa_core``, ``gsa_core`` free of ``transformers`` and ``gsa_plugins``, and a
  layered order of the integrations (so they form no cycles);
- an AST scan checks that no module uses a private name (``_x``) defined in another top-level ``gsa_*``
  package: ``from other import _x``, ``other_module._x``, or ``obj._x`` where ``_x`` is a private function,
  class, method or attribute defined only in another package. Widen the public contract instead.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def packages() -> dict[str, Path]:
    """Every top-level ``gsa_*`` import package of the project: ``gsa_core``, ``gsa_plugins`` and the integrations."""
    found = {p.name: p for p in (ROOT / "gsa_core", ROOT / "gsa_plugins")}
    found.update({p.name: p for p in sorted((ROOT / "integrations").glob("gsa_*")) if (p / "__init__.py").is_file()})
    return found


def importlinter_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


# ----------------------------------------------------------------------------- import-linter
def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"import contracts broken:\n{out.stdout}\n{out.stderr}"


def test_contracts_name_every_integration() -> None:
    """A new integration package must join the contracts, or they would not check it."""
    config = importlinter_config()
    integrations = set(packages()) - {"gsa_core", "gsa_plugins"}
    assert set(config["root_packages"]) == integrations | {"gsa_core", "gsa_plugins"}
    by_name = {c["name"]: c for c in config["contracts"]}

    def named(layer: str) -> set[str]:
        return {part.strip() for part in layer.replace("|", ":").split(":")}

    top = by_name["integrations -> gsa_plugins -> gsa_core"]["layers"]
    assert named(top[0]) == integrations and top[1:] == ["gsa_plugins", "gsa_core"]
    order = by_name["integrations form no cycles"]["layers"]
    assert set().union(*(named(layer) for layer in order)) == integrations
    assert all(":" not in layer for layer in order), "siblings joined by ':' may import each other (cycles)"
    forbidden = by_name["gsa_core imports neither transformers nor gsa_plugins"]
    assert forbidden["source_modules"] == ["gsa_core"]
    assert set(forbidden["forbidden_modules"]) == {"transformers", "gsa_plugins"}


# ----------------------------------------------------------------------------- private names
@dataclass(frozen=True)
class Reach:
    path: str
    line: int
    code: str
    owner: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} (private to {self.owner})"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules(root: Path) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, assignments, and ``self._x`` attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return {n for n in names if _private(n)}


def _bindings(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """Names bound by imports: to ``gsa_*`` modules (name -> module), and to anything else."""
    gsa: dict[str, str] = {}
    other: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                target = alias.name if alias.asname else alias.name.split(".")[0]
                (gsa.__setitem__(bound, target) if target.startswith("gsa_") else other.add(bound))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                bound = alias.asname or alias.name
                if node.module.startswith("gsa_"):
                    gsa[bound] = f"{node.module}.{alias.name}"
                else:
                    other.add(bound)
    return gsa, other


def private_reaches(found_packages: dict[str, Path] | None = None) -> list[Reach]:
    trees = {name: list(_modules(root)) for name, root in (found_packages or packages()).items()}
    defined: dict[str, set[str]] = defaultdict(set)
    for name, modules in trees.items():
        for _, tree in modules:
            defined[name] |= _definitions(tree)
    found: list[Reach] = []
    for package, modules in trees.items():
        for path, tree in modules:
            rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            gsa, other = _bindings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    top = node.module.split(".")[0]
                    if top.startswith("gsa_") and top != package:
                        found += [Reach(rel, node.lineno, f"from {node.module} import {a.name}", top)
                                  for a in node.names if _private(a.name)]
                if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                    continue
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue  # the object's own attribute
                if isinstance(base, ast.Name) and base.id in other:
                    continue  # another library's module
                if isinstance(base, ast.Name) and base.id in gsa:
                    top = gsa[base.id].split(".")[0]
                    if top != package:
                        found.append(Reach(rel, node.lineno, ast.unparse(node), top))
                    continue
                owners = sorted(p for p, names in defined.items() if p != package and node.attr in names)
                if owners and node.attr not in defined[package]:
                    found.append(Reach(rel, node.lineno, ast.unparse(node), ", ".join(owners)))
    return found


def test_no_module_reaches_into_another_packages_private_names() -> None:
    found = private_reaches()
    assert not found, "private names used across gsa_* packages (widen the public contract instead):\n" + "\n".join(
        map(str, found))


@pytest.mark.parametrize(("source", "expected"), [
    ("from gsa_core.attention import _helper\n", "from gsa_core.attention import _helper"),
    ("import gsa_core.numerics as num\nnum._private()\n", "num._private"),
    ("from gsa_core import registry\nregistry._default\n", "registry._default"),
    ("def f(layer):\n    return layer._collecting\n", "layer._collecting"),
    ("class C:\n    def f(self):\n        return self.controller._collecting\n", "self.controller._collecting"),
])
def test_the_scan_finds_each_kind_of_reach(tmp_path: Path, source: str, expected: str) -> None:
    """The scan itself: a fake integration reaching into gsa_core is caught, and its own private names are not."""
    fake = tmp_path / "gsa_fake"
    fake.mkdir()
    (fake / "__init__.py").write_text(source + "class Own:\n    def _mine(self):\n        return self._mine\n")
    reaches = [r for r in private_reaches({**packages(), "gsa_fake": fake}) if r.path.startswith(str(fake))]
    assert [r.code for r in reaches] == [expected]
