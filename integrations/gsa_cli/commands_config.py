"""``gsa config validate FILE`` and ``gsa config schema``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gsa_cli.output import print_json
from gsa_core.config import GSAConfig, config_json_schema
from gsa_core.errors import OutputPathError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    validate = sub.add_parser("validate", help="check a TOML/JSON/YAML config; print it with defaults filled")
    validate.add_argument("file", type=Path)
    validate.add_argument("--json", action="store_true", help="print the validated config as JSON")
    validate.set_defaults(handler=run_validate)
    schema = sub.add_parser("schema", help="JSON Schema of the config, listing every registered strategy")
    schema.add_argument("--out", type=Path, help="write to this file instead of stdout")
    schema.set_defaults(handler=run_schema)


def run_validate(args: argparse.Namespace) -> int:
    config = GSAConfig.from_file(args.file)  # ConfigError is reported by the main entry point
    if args.json:
        print_json(config.to_dict())
    else:
        print(f"{args.file}: valid GSA config")
        for line in _summary(config):
            print(f"  {line}")
    return 0


def _summary(config: GSAConfig) -> list[str]:
    b = config.bank
    lines = [
        f"bank: {b.n_splats} splats/head, {b.covariance} covariance",
        f"initializer: {config.initializer.name} {config.initializer.params}",
        f"backend: {config.backend.name} {config.backend.params}",
    ]
    a = config.adaptation
    state = "on" if a.enabled else "off"
    lines.append(f"adaptation ({state}): scheduler={a.scheduler.name}, death={a.death.name}, birth={a.birth.name}")
    lines.append(f"adapter: {config.adapter.name if config.adapter else 'detect from model'}")
    return lines


def run_schema(args: argparse.Namespace) -> int:
    text = json.dumps(config_json_schema(), indent=2)
    if args.out:
        from gsa_data.files import atomic_write_text

        if args.out.is_dir():
            raise OutputPathError(f"--out {args.out} is a folder: give a file name, e.g. {args.out / 'schema.json'}")
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
