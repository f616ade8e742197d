"""``gsa plugins list``: what is registered (components, commands, benchmarks), by whom."""

from __future__ import annotations

import argparse

from gsa_cli.output import print_json, print_table
from gsa_core.protocols import KINDS
from gsa_core.registry import get_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plugins_command", required=True, metavar="COMMAND")
    ls = sub.add_parser("list", help="list registered components and the plugins providing them")
    ls.add_argument("--kind", choices=KINDS, help="only components of this kind")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=run_list)


def run_list(args: argparse.Namespace) -> int:
    registry = get_registry()
    components = registry.components(args.kind)
    commands = [] if args.kind else [*registry.commands("command"), *registry.commands("benchmark")]
    plugins = registry.plugins()
    if args.json:
        print_json({
            "components": [
                {"kind": c.kind, "name": c.name, "description": c.description, "plugin": c.provider.name,
                 "distribution": c.provider.distribution, "version": c.provider.version,
                 "params": c.params_model.model_json_schema()}
                for c in components
            ],
            "commands": [{"group": c.group, "name": c.name, "help": c.help, "plugin": c.provider.name,
                          "distribution": c.provider.distribution, "version": c.provider.version}
                         for c in commands],
            "plugins": [p.__dict__ for p in plugins],
        })
        return 0
    print_table(
        "GSA components" + (f" ({args.kind})" if args.kind else ""),
        ["kind", "name", "plugin", "distribution", "description"],
        [(c.kind, c.name, c.provider.name, _dist(c.provider), c.description) for c in components],
    )
    if commands:
        print_table("commands", ["command", "plugin", "distribution", "help"],
                    [(("gsa bench " if c.group == "benchmark" else "gsa ") + c.name, c.provider.name,
                      _dist(c.provider), c.help) for c in commands])
    print_table("plugins", ["plugin", "distribution", "status", "module", "error"],
                [(p.name, _dist(p), p.status, p.module, p.error) for p in plugins])
    return 0


def _dist(p) -> str:
    return f"{p.distribution} {p.version}" if p.distribution else "-"
