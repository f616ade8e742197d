"""Shared fixtures: fake installed distributions (entry-point discovery); the visualisation tests' models."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Create an importable distribution with ``gsa.plugins`` entry points on a temporary sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created_modules: list[str] = []

    def make(dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[gsa.plugins]\n{eps}\n")
        for mod, source in modules.items():
            (site / f"{mod}.py").write_text(textwrap.dedent(source))
            created_modules.append(mod)
        return info

    yield make
    for mod in created_modules:
        sys.modules.pop(mod, None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The visualisation tests' tiny model folders (``tests/_viz_models.py``; built once per process)."""
    from _viz_models import models

    return models(tmp_path_factory)


@pytest.fixture(scope="module")
def viz(folders: dict[str, Path]):
    """The tiny GSA model of ``folders`` loaded for the pictures (a module may override it with a fresh one)."""
    from gsa_viz.inputs import load_gsa_model

    return load_gsa_model(folders["gsa"])
