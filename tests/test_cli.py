"""The ``gsa`` command: tables, ``--json`` and exit codes, run as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


# ----------------------------------------------------------------------------- commands from plugins
PLUGIN = """
from gsa_core import hookimpl

def configure(parser):
    parser.add_argument("--name", default="world")
    parser.set_defaults(handler=run)

def run(args):
    print(f"hello {args.name}")
    return 3

@hookimpl
def gsa_register_commands(cli):
    cli.command("hello", "cli_hello_mod:configure", help="say hello")
    cli.command("broken", "no_such_module_xyz:configure", help="a command whose module is missing")
    cli.benchmark("hello", configure, help="a benchmark that says hello")
"""


def test_a_plugin_command_and_benchmark_run(gsa, fake_dist):
    from gsa_core.registry import scoped_registry

    fake_dist("cli-hello", "1.0", {"hello": "cli_hello_mod"}, {"cli_hello_mod": PLUGIN})
    with scoped_registry():
        out = gsa("hello", "--name", "GSA")
        assert out.returncode == 3 and out.stdout.strip() == "hello GSA"
        assert gsa("bench", "hello").stdout.strip() == "hello world"
        listed = gsa("--help").stdout
        assert "hello" in listed and "say hello" in listed and "train" in listed
        out = gsa("plugins", "list", "--json")
        commands = {(c["group"], c["name"], c["distribution"]) for c in json.loads(out.stdout)["commands"]}
        assert {("command", "hello", "cli-hello"), ("benchmark", "hello", "cli-hello"),
                ("command", "train", "gaussian-splat-attention")} <= commands
        broken = gsa("broken")
        assert broken.returncode == 2 and "Traceback" not in broken.stderr
        assert "command 'broken' from plugin 'hello' (cli-hello 1.0) could not be loaded" in broken.stderr
        assert "no_such_module_xyz" in broken.stderr
        assert gsa("config", "schema").returncode == 0  # the rest keeps working


def test_help_imports_no_command_module():
    code = ("import sys; from gsa_cli.parser import build_parser; p = build_parser(); p.format_help();"
            "print(sorted(m for m in sys.modules if m.startswith(('gsa_cli.commands_', 'gsa_train', 'gsa_chat',"
            "'gsa_distill', 'transformers')) or (m.startswith('gsa_bench.') and m != 'gsa_bench.plugin')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    code = ("import sys; from gsa_cli.parser import build_parser\n"
            "try:\n    build_parser().parse_args(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('gsa_cli.commands_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "['gsa_cli.commands_train']"
    assert "--steps" in out.stdout  # the chosen command's own options, loaded on demand


def test_no_commands_without_the_builtin_plugin_says_why():
    exe = shutil.which("gsa")
    env = {**os.environ, "GSA_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("GSA_PLUGINS", None)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "no commands are registered" in " ".join(out.stdout.split())
    env["GSA_PLUGINS"] = "cli,builtin"
    out = subprocess.run([exe, "plugins", "list", "--kind", "backend"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0 and "dense" in out.stdout
