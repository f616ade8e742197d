"""``gsa eval``: registered through the ``gsa.plugins`` entry point (``eval = "gsa_eval.plugin"``) like any plugin's
command; its module is imported only when ``gsa eval`` runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gsa_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from gsa_core.commands import CommandSet


@hookimpl
def gsa_register_commands(cli: CommandSet) -> None:
    cli.command("eval", "gsa_eval.commands:add_arguments",
                help="long-context evaluations: passkey retrieval and loss against context length (JSON + plot)")
