"""Shared output helper of the benchmark scripts."""

from __future__ import annotations


def print_table(rows: list[tuple[str, str]]) -> None:
    """A two-column Markdown table (measure, value), ready to paste into the README."""
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
