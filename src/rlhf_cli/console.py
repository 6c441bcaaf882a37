"""The one way this tool makes a rich Console: full width on a terminal, never cut when piped.

Rich sizes a console that is not a terminal to 80 columns and crops tables, paths and YAML at the edge with "…",
so a CI log or `> file` lost the ends of paths and of the launch command. Piped output gets a width no line here
reaches and soft wrapping, so every line comes out verbatim and can be copied.
"""

from __future__ import annotations

import os
import sys

PIPED_WIDTH = 1000


def make_console(*, stderr: bool = False, **kwargs):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ:
        kwargs.setdefault("width", PIPED_WIDTH)
        kwargs.setdefault("soft_wrap", True)
    return Console(stderr=stderr, **kwargs)


def print_yaml(console, text: str) -> None:
    """YAML highlighted on a terminal, verbatim text otherwise (copyable into a file)."""
    if console.is_terminal:
        from rich.syntax import Syntax

        console.print(Syntax(text, "yaml"))
    else:
        console.print(text.rstrip("\n"), markup=False, highlight=False)


def heading(console, text: str) -> None:
    """A section heading: a rule across a terminal, one plain line in a log."""
    if console.is_terminal:
        console.rule(text)
    else:
        console.print(f"== {text} ==")


def show_plan(title: str, plan: dict) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in plan.items():
        table.add_row(key, str(value))
    console = make_console()
    console.print(table)
    console.print("[dim]Dry run: nothing was started or written.[/]")
