"""Terminal output for the ``gsa`` command: tables for people, JSON for scripts."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from gsa_common.text import terminal_safe
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gsa_core.errors import bounded


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=escape(terminal_safe(title)), title_justify="left", show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else escape(terminal_safe(str(v))) for v in row))
    Console(soft_wrap=False, width=max(100, Console().width)).print(table)


def error(message: str) -> None:
    """One line on stderr: newlines folded, control characters neutralised, at most 1,000 characters."""
    line = bounded(terminal_safe(re.sub(r"\s*\n\s*", " ", message.strip())))
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False)
