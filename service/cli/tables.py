"""Rendering of the commands' tables with rich: ``(title, headers, rows)`` triples, as the metric
functions of :mod:`models` return them, and the per-class nucleus counts of ``infer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Table", "print_counts", "print_scores", "print_tables"]

Table = tuple[str, Sequence[str], Sequence[Sequence[str]]]
"""A caption, the column names and the rows of one table, every cell already text."""


def print_tables(tables: Sequence[Table], title: str | None = None) -> None:
    """Print each table under its caption, after ``title`` when one is given.

    Parameters
    ----------
    tables : sequence of (str, sequence of str, sequence of sequence of str)
        Caption, column names and rows of each table.
    title : str, optional
        A line printed before the tables.
    """
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    if title:
        console.print(title)
    for caption, header, rows in tables:
        table = RichTable(title=caption)
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def print_scores(result: dict[str, Any], title: str | None = None) -> None:
    """Print the summary tables of one evaluation result (``models.evaluate``'s layout)."""
    from models.evaluate_tables import summary_tables

    print_tables(summary_tables(result), title)


def print_counts(title: str, counts: Mapping[str, int], total: int, footer: str) -> None:
    """Print nuclei per class and in all under ``title``, then the ``footer`` line.

    Parameters
    ----------
    title : str
        The table's caption (what was analysed, where the results went).
    counts : mapping of str to int
        Nuclei per class name.
    total : int
        Nuclei in all.
    footer : str
        A line printed under the table (model, timing).
    """
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(stderr=False)
    table = RichTable(title=title, show_header=True)
    table.add_column("class")
    table.add_column("nuclei", justify="right")
    for name, count in counts.items():
        table.add_row(name, f"{count:,}")
    table.add_row("[bold]total[/bold]", f"[bold]{total:,}[/bold]")
    console.print(table)
    console.print(footer)
