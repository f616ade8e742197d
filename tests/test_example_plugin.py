"""Round trip of a real third-party plugin: install it, discover it, list it, select it, check it, run its command
and its benchmark."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gsa_core.config import GSAConfig
from gsa_core.registry import scoped_registry
from gsa_core.testing import check_birth_policy, check_scheduler

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gsa-example-plugin"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed_example() -> Iterator[None]:
    """pip-install the example into this environment (as a user would) and remove it afterwards."""
    already = _is_installed()
    if not already:
        _pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
        shutil.rmtree(EXAMPLE / "build", ignore_errors=True)  # build artefacts of the non-editable install
    importlib.invalidate_caches()
    yield
    if not already:
        _pip("uninstall", "-y", "gsa-example-plugin")
        for mod in [m for m in sys.modules if m.startswith("gsa_example_plugin")]:
            del sys.modules[mod]


def _is_installed() -> bool:
    try:
        importlib.metadata.distribution("gsa-example-plugin")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_discovered_with_its_distribution(installed_example):
    with scoped_registry() as reg:
        birth = reg.get("birth", "centroid-seed")
        assert birth.provider.name == "example"
        assert birth.provider.distribution == "gsa-example-plugin"
        assert birth.provider.version == "0.1.0"
        assert "geometric" in reg.names("scheduler")


def test_listed_by_the_cli(installed_example):
    out = subprocess.run([shutil.which("gsa") or "gsa", "plugins", "list", "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(out.stdout)
    names = {(c["kind"], c["name"], c["distribution"]) for c in data["components"]}
    assert ("birth", "centroid-seed", "gsa-example-plugin") in names
    assert ("scheduler", "geometric", "gsa-example-plugin") in names
    table = subprocess.run([shutil.which("gsa") or "gsa", "plugins", "list", "--kind", "scheduler"],
                           capture_output=True, text=True, check=True, timeout=120).stdout
    assert "geometric" in table and "example" in table


def test_selectable_by_name_in_a_config(installed_example, tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(
        "[adaptation]\nenabled = true\n"
        'scheduler = { name = "geometric", params = { first = 50 } }\n'
        'birth = { name = "centroid-seed", params = { per_head = 2 } }\n'
    )
    with scoped_registry():
        cfg = GSAConfig.from_file(path)
        assert cfg.adaptation.birth.params == {"per_head": 2, "jitter": 0.05}
        scheduler = cfg.adaptation.scheduler.build()
        assert [s for s in range(0, 500) if scheduler.should_refine(s)] == [50, 100, 200, 400]
        with pytest.raises(Exception, match="Did you mean 'centroid-seed'"):
            GSAConfig.from_dict({"adaptation": {"birth": "centroid-sed"}})


def test_passes_the_conformance_kit(installed_example):
    with scoped_registry() as reg:
        check_birth_policy(reg.build("birth", "centroid-seed", {"per_head": 3}))
        check_scheduler(reg.build("scheduler", "geometric"))


def test_disabled_by_allow_list(installed_example, monkeypatch):
    monkeypatch.setenv("GSA_PLUGINS", "builtin")
    with scoped_registry() as reg:
        assert "geometric" not in reg.names("scheduler")


def _gsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("gsa") or "gsa", *args], capture_output=True, text=True, timeout=120)


def test_adds_a_command(installed_example):
    out = _gsa("example-schedule", "--params", '{"first": 50}', "--steps", "500")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["50", "100", "200", "400"]  # first * ratio^k, ratio 2
    assert "example-schedule" in _gsa("--help").stdout
    bad = _gsa("example-schedule", "--scheduler", "geometrik")
    assert bad.returncode == 2 and "Did you mean 'geometric'" in bad.stderr and "Traceback" not in bad.stderr
    listed = json.loads(_gsa("plugins", "list", "--json").stdout)["commands"]
    entry = next(c for c in listed if c["name"] == "example-schedule")
    assert (entry["group"], entry["plugin"], entry["distribution"]) == ("command", "example", "gsa-example-plugin")


def test_adds_a_benchmark_on_the_scaffold(installed_example, tmp_path):
    out = _gsa("bench", "schedulers", "--steps", "1000", "--out", str(tmp_path), "--quiet")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "schedulers.json").read_text())
    assert report["schema"] == "gsa-example-schedulers/1" and report["steps"] == 1000
    # geometric with its defaults (first 100, ratio 2) refines at 100, 200, 400, 800
    assert report["schedulers"]["geometric"] == {"refines": 4, "first": 100}
    assert {"interval", "decaying", "shift"} <= set(report["schedulers"])
    for key in ("started", "finished", "loadavg_1m", "environment", "command"):  # the scaffold's run metadata
        assert key in report, key
    assert "| geometric | 4 | 100 |" in (tmp_path / "schedulers.md").read_text()
    assert "| geometric | 4 | 100 |" in out.stdout
