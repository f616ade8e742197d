"""The built-in ``gsa`` commands, registered through the ``gsa.plugins`` entry point like any plugin's.

Each target is ``gsa_cli.commands_<name>:add_arguments``, imported only when its command runs; the
modules import their heavy dependencies inside the handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gsa_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from gsa_core.commands import CommandSet

#: ``gsa NAME``: (module under ``gsa_cli``, help), in the order ``gsa --help`` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("commands_plugins", "inspect registered plugins, components and commands"),
    "config": ("commands_config", "validate configs, export the JSON Schema"),
    "demo": ("commands_demo", "end-to-end demo on the embedded default (no download)"),
    "chat": ("commands_chat", "chat with a model in the terminal (streams replies, keeps sessions)"),
    "logs": ("commands_logs", "list and show saved chat sessions"),
    "train": ("commands_train", "train a GPT-Neo (softmax or GSA) from scratch on a text corpus"),
    "convert": ("commands_convert", "convert a Hugging Face model to GSA and save it"),
    "distill": ("commands_distill", "calibrate and distil a converted model against its original"),
    "bench": ("commands_bench", "run a benchmark; writes JSON and a plot"),
}


@hookimpl
def gsa_register_commands(cli: CommandSet) -> None:
    for name, (module, help_text) in COMMANDS.items():
        cli.command(name, f"gsa_cli.{module}:add_arguments", help=help_text)
    cli.command("serve", "gsa_serve.command:add_arguments",
                help="serve a model over an OpenAI-compatible HTTP API (continuous batching, metrics)")
