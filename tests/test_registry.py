"""Registry behaviour, including every error path with its exact message content."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import Field

from gsa_core.errors import DuplicateComponentError, ParamsError, UnknownComponentError, UnknownKindError
from gsa_core.registry import (
    GSAPluginWarning,
    NoParams,
    Registry,
    StrategyParams,
    get_registry,
    scoped_registry,
)

SCHEDULER_PLUGIN = """
from gsa_core import hookimpl, StrategyParams

class Every(StrategyParams):
    n: int = 3
    def should_refine(self, step, signals=None):
        return step >= 0 and step % self.n == 0

@hookimpl
def gsa_register(registry):
    registry.register("scheduler", "{name}", Every)
"""


class Always(StrategyParams):
    def should_refine(self, step, signals=None):
        return step >= 0


def test_builtins_come_through_the_entry_point():
    with scoped_registry() as reg:
        plugins = {p.name: p for p in reg.plugins()}
        assert plugins["builtin"].distribution == "gaussian-splat-attention"
        assert plugins["builtin"].version
        assert {"random"} <= set(reg.names("initializer"))
        assert {"dense", "auto"} <= set(reg.names("backend"))
        assert all(c.provider.distribution == "gaussian-splat-attention" for c in reg.components())
        assert {reg.get("backend", "dense").provider.name, reg.get("adapter", "bert").provider.name} == {"builtin"}


def test_unknown_name_lists_names_and_suggests():
    with scoped_registry() as reg, pytest.raises(UnknownComponentError) as info:
        reg.build("scheduler", "intervl")
    msg = str(info.value)
    assert "unknown scheduler 'intervl'" in msg
    assert "Did you mean 'interval'?" in msg
    assert "Available scheduler names: " in msg
    assert "interval" in msg.split("Available scheduler names: ")[1]
    assert info.value.suggestion == "interval"


def test_unknown_name_without_close_match_has_no_suggestion():
    with scoped_registry() as reg, pytest.raises(UnknownComponentError) as info:
        reg.get("backend", "zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "auto" in str(info.value) and "dense" in str(info.value)


def test_unknown_kind():
    with scoped_registry() as reg, pytest.raises(UnknownKindError, match="Did you mean 'backend'"):
        reg.names("backends")


def test_duplicate_names_both_providers(fake_dist):
    fake_dist("dup-plugin", "2.3.4", {"dupe": "dupe_mod"},
              {"dupe_mod": SCHEDULER_PLUGIN.replace("{name}", "interval")})
    with scoped_registry() as reg, pytest.raises(DuplicateComponentError) as info:
        reg.names("scheduler")
    msg = str(info.value)
    assert "scheduler 'interval' is registered twice" in msg
    assert "plugin 'builtin' (gaussian-splat-attention" in msg
    assert "plugin 'dupe' (dup-plugin 2.3.4)" in msg
    assert "override=True" in msg


def test_duplicate_direct_registration_names_the_calling_module():
    with scoped_registry() as reg:
        pattern = r"first by plugin 'builtin'.*then by module '(tests\.)?test_registry'"
        with pytest.raises(DuplicateComponentError, match=pattern):
            reg.register("scheduler", "interval", Always)
        reg.register("scheduler", "interval", Always, override=True)
        assert isinstance(reg.build("scheduler", "interval"), Always)
    # the override stayed inside the scope
    assert type(get_registry().build("scheduler", "interval")).__name__ == "IntervalScheduler"


def test_broken_plugin_import_warns_and_rest_works(fake_dist):
    fake_dist("broken-plugin", "0.0.1", {"broken": "broken_mod"}, {"broken_mod": "import not_a_module_xyz\n"})
    fake_dist("good-plugin", "1.0", {"good": "good_mod"}, {"good_mod": SCHEDULER_PLUGIN.replace("{name}", "every")})
    with scoped_registry() as reg:
        with pytest.warns(GSAPluginWarning, match=r"plugin 'broken' \(broken-plugin 0.0.1\) was skipped: import "
                                                  r"failed: ModuleNotFoundError"):
            names = reg.names("scheduler")
        assert "every" in names and "interval" in names
        status = {p.name: p.status for p in reg.plugins()}
        assert status["broken"] == "failed" and status["good"] == "loaded" and status["builtin"] == "loaded"
        assert all(s == "loaded" for name, s in status.items() if name != "broken")


def test_plugin_whose_hook_raises_is_rolled_back(fake_dist):
    source = """
from gsa_core import hookimpl, StrategyParams
class S(StrategyParams):
    def should_refine(self, step, signals=None):
        return False
@hookimpl
def gsa_register(registry):
    registry.register("scheduler", "half-done", S)
    raise RuntimeError("boom")
"""
    fake_dist("raising-plugin", "1.0", {"raising": "raising_mod"}, {"raising_mod": source})
    with scoped_registry() as reg:
        with pytest.warns(GSAPluginWarning, match="gsa_register raised RuntimeError: boom"):
            names = reg.names("scheduler")
        assert "half-done" not in names


def test_disable_autoload_env(monkeypatch):
    monkeypatch.setenv("GSA_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert reg.names("backend") == []
    assert reg.plugins() == []


def test_allow_list_env(monkeypatch, fake_dist):
    fake_dist("good-plugin", "1.0", {"good": "good_mod"}, {"good_mod": SCHEDULER_PLUGIN.replace("{name}", "every")})
    monkeypatch.setenv("GSA_PLUGINS", "good")
    reg = Registry()
    assert reg.names("scheduler") == ["every"]
    assert [p.name for p in reg.plugins()] == ["good"]


def test_allow_list_with_autoload_disabled_still_loads_listed(monkeypatch):
    monkeypatch.setenv("GSA_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("GSA_PLUGINS", "builtin")
    assert "dense" in Registry().names("backend")


def test_allow_list_unknown_name_warns(monkeypatch):
    monkeypatch.setenv("GSA_PLUGINS", "builtin,nope")
    with pytest.warns(GSAPluginWarning, match="GSA_PLUGINS names plugin 'nope'"):
        Registry().names("backend")


def test_loading_is_lazy():
    code = (
        "import sys, gsa_core; from gsa_core import get_registry, GSAConfig; r = get_registry();"
        "assert 'gsa_plugins.plugin' not in sys.modules, 'loaded at import';"
        "r.names('backend'); assert 'gsa_plugins.plugin' in sys.modules; print('lazy ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "lazy ok" in out.stdout


def test_gsa_core_never_imports_transformers():
    code = ("import sys, gsa_core, gsa_core.testing; gsa_core.get_registry().components();"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_params_are_validated_with_field_names():
    with scoped_registry() as reg:
        with pytest.raises(ParamsError) as info:
            reg.build("scheduler", "interval", {"every": 0, "strat": 1})
        msg = str(info.value)
        assert "invalid params for scheduler 'interval'" in msg
        assert "every: Input should be greater than or equal to 1 (got 0)" in msg
        assert "strat: Extra inputs are not permitted" in msg
        built = reg.build("scheduler", "interval", {"every": 7})
        assert built.every == 7


def test_component_with_separate_params_model_and_protocol_check(gsa_registry):
    class Params(StrategyParams):
        value: float = Field(1.0, gt=0)

    class NotADeathPolicy:
        def __init__(self, params):
            self.params = params

    gsa_registry.register("death", "broken", NotADeathPolicy, Params)
    with pytest.raises(TypeError, match="does not implement the DeathPolicy protocol"):
        gsa_registry.build("death", "broken", {"value": 2})
    with pytest.raises(TypeError, match="pass params=<pydantic model>"):
        gsa_registry.register("death", "no-params", NotADeathPolicy)


def test_fixture_registry_is_isolated(gsa_registry):
    gsa_registry.register("scheduler", "always", Always)
    assert "always" in gsa_registry.names("scheduler")
    assert get_registry() is gsa_registry


def test_fixture_registry_did_not_leak():
    assert "always" not in get_registry().names("scheduler")


def test_empty_registry_fixture(gsa_empty_registry):
    assert gsa_empty_registry.components() == []
    gsa_empty_registry.register("scheduler", "always", Always)
    never = type("Never", (NoParams,), {"should_refine": Always.should_refine})
    gsa_empty_registry.register("scheduler", "noparams", never)
    assert gsa_empty_registry.names("scheduler") == ["always", "noparams"]


# ----------------------------------------------------------------------------- commands (gsa_register_commands)
COMMAND_PLUGIN = """
from gsa_core import hookimpl

def configure(parser):
    parser.add_argument("--name", default="world")
    parser.set_defaults(handler=lambda args: print(f"hello {args.name}") or 0)

@hookimpl
def gsa_register_commands(cli):
    cli.command("{name}", "{module}:configure", help="say hello")
    cli.benchmark("{name}-bench", configure, help="a benchmark")
"""


def command_plugin(name: str, module: str) -> str:
    return COMMAND_PLUGIN.replace("{name}", name).replace("{module}", module)


def test_builtin_commands_and_benchmarks_come_through_entry_points():
    with scoped_registry() as reg:
        commands = {c.name: c for c in reg.commands("command")}
        assert {"plugins", "config", "train", "convert", "distill", "bench", "chat"} <= set(commands)
        # the project's own commands come through its own entry points: the CLI's, gsa eval's, gsa viz's and report's
        assert {c.provider.name for c in commands.values()} == {"cli", "eval", "viz"}
        assert {c.provider.distribution for c in commands.values()} == {"gaussian-splat-attention"}
        assert commands["eval"].provider.name == "eval"
        assert commands["viz"].provider.name == commands["report"].provider.name == "viz"
        assert commands["train"].provider.distribution == "gaussian-splat-attention"
        assert commands["train"].target == "gsa_cli.commands_train:add_arguments"
        benchmarks = {c.name: c for c in reg.commands("benchmark")}
        assert {"attention", "init", "adaptation", "decode", "distill_bert", "distill_causal"} <= set(benchmarks)
        assert {c.provider.name for c in benchmarks.values()} == {"bench"}
        with pytest.raises(ValueError, match="unknown command group 'benchmarks'"):
            reg.commands("benchmarks")


def test_a_plugin_adds_a_command_and_a_benchmark(fake_dist):
    fake_dist("hello-plugin", "1.2", {"hello": "hello_mod"}, {"hello_mod": command_plugin("hello", "hello_mod")})
    with scoped_registry() as reg:
        command = next(c for c in reg.commands("command") if c.name == "hello")
        assert (command.provider.name, command.provider.distribution, command.help) == ("hello", "hello-plugin",
                                                                                       "say hello")
        assert "hello_mod" in sys.modules  # the plugin module itself, imported to find its hook
        assert callable(command.load())
        bench = next(c for c in reg.commands("benchmark") if c.name == "hello-bench")
        assert bench.load() is command.load()


def test_a_command_hook_that_fails_warns_and_the_rest_works(fake_dist):
    source = SCHEDULER_PLUGIN.replace("{name}", "every") + """
@hookimpl
def gsa_register_commands(cli):
    import not_a_module_xyz
"""
    fake_dist("half-plugin", "1.0", {"half": "half_mod"}, {"half_mod": source})
    with scoped_registry() as reg:
        with pytest.warns(GSAPluginWarning, match=r"the commands of GSA plugin 'half' \(half-plugin 1.0\) were "
                                                  r"skipped: gsa_register_commands raised ModuleNotFoundError"):
            names = [c.name for c in reg.commands("command")]
        assert "train" in names
        assert "every" in reg.names("scheduler")  # its components are unaffected


def test_a_duplicate_command_warns_and_the_first_is_kept(fake_dist):
    fake_dist("dup-cmd", "0.1", {"zz-dup": "dup_cmd_mod"}, {"dup_cmd_mod": command_plugin("train", "dup_cmd_mod")})
    with scoped_registry() as reg:
        with pytest.warns(GSAPluginWarning, match=r"'gsa train' is registered twice, first by plugin 'cli'.*then by "
                                                  r"plugin 'zz-dup' \(dup-cmd 0.1\); the first is kept"):
            train = next(c for c in reg.commands("command") if c.name == "train")
        assert train.provider.name == "cli"


def test_bad_command_names_are_rejected(fake_dist):
    source = command_plugin("two words", "bad_name_mod")
    fake_dist("bad-name", "0.1", {"badname": "bad_name_mod"}, {"bad_name_mod": source})
    with scoped_registry() as reg, pytest.warns(GSAPluginWarning, match="command names are non-empty words"):
        assert "two words" not in [c.name for c in reg.commands("command")]


def test_a_directly_loaded_plugin_adds_commands_after_collection(gsa_registry, tmp_path, monkeypatch):
    (tmp_path / "late_mod.py").write_text(command_plugin("late", "late_mod"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "late" not in [c.name for c in gsa_registry.commands("command")]
    import late_mod

    try:
        gsa_registry.load_plugin(late_mod)
        assert "late" in [c.name for c in gsa_registry.commands("command")]
    finally:
        sys.modules.pop("late_mod", None)
