"""The ``gsa`` command: tables, ``--json`` and exit codes, run as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

import pytest
from gsa_cli.main import main


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def gsa(capsys):
    """Run the CLI in-process (fast); ``test_console_script`` covers the installed executable."""

    def run(*args: str) -> Result:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def test_console_script():
    exe = shutil.which("gsa")
    assert exe, "the gsa console script is not installed"
    out = subprocess.run([exe, "plugins", "list", "--kind", "scheduler"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "interval" in out.stdout


def test_plugins_list_table(gsa):
    out = gsa("plugins", "list")
    assert out.returncode == 0, out.stderr
    assert "GSA components" in out.stdout and "dense" in out.stdout and "builtin" in out.stdout


def test_plugins_list_json_kind(gsa):
    out = gsa("plugins", "list", "--kind", "backend", "--json")
    data = json.loads(out.stdout)
    assert {c["kind"] for c in data["components"]} == {"backend"}
    dense = next(c for c in data["components"] if c["name"] == "dense")
    assert dense["distribution"] == "gaussian-splat-attention" and "properties" in dense["params"]
    assert any(p["name"] == "builtin" and p["status"] == "loaded" for p in data["plugins"])


def test_plugins_list_bad_kind_lists_choices(gsa):
    out = gsa("plugins", "list", "--kind", "backends")
    assert out.returncode == 2 and "invalid choice: 'backends'" in out.stderr and "backend" in out.stderr


def test_config_validate_ok(gsa, tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('backend = "dense"\n[bank]\nn_splats = 16\n')
    out = gsa("config", "validate", str(path))
    assert out.returncode == 0, out.stderr
    assert "valid GSA config" in out.stdout and "16 splats/head" in out.stdout
    data = json.loads(gsa("config", "validate", str(path), "--json").stdout)
    assert data["bank"]["n_splats"] == 16 and data["backend"]["params"]["block_elements"] > 0


def test_config_validate_misspelled_name(gsa, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[adaptation]\nscheduler = "intervall"\n')
    out = gsa("config", "validate", str(path))
    assert out.returncode != 0
    assert "adaptation.scheduler.name" in out.stderr
    assert "'intervall'" in out.stderr
    assert "Did you mean 'interval'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_validate_missing_file(gsa, tmp_path):
    out = gsa("config", "validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "config file not found" in out.stderr and "Traceback" not in out.stderr


def test_config_schema(gsa, tmp_path):
    out = gsa("config", "schema")
    assert out.returncode == 0
    assert "BackendSpec" in json.loads(out.stdout)["$defs"]
    target = tmp_path / "schema.json"
    assert gsa("config", "schema", "--out", str(target)).returncode == 0
    assert json.loads(target.read_text())["title"] == "GSAConfig"


@pytest.mark.parametrize("args", [[], ["plugins"], ["config"]])
def test_missing_subcommand_is_a_usage_error(gsa, args):
    out = gsa(*args)
    assert out.returncode == 2 and "usage: gsa" in out.stderr
