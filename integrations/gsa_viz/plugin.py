"""``gsa viz`` and ``gsa report``: registered through the ``gsa.plugins`` entry point (``viz = "gsa_viz.plugin"``)
like any plugin's commands; their modules are imported only when they run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gsa_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from gsa_core.commands import CommandSet


@hookimpl
def gsa_register_commands(cli: CommandSet) -> None:
    cli.command("viz", "gsa_viz.commands:add_arguments",
                help="pictures of a GSA model or run: splats, attention vs softmax, coverage, adaptation (PNG)")
    cli.command("report", "gsa_viz.report:add_arguments",
                help="one self-contained HTML page: every benchmark's table and plot, optionally a model card")
