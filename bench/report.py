"""Shared by the bench scripts: one plain-text table format."""

from __future__ import annotations


def print_table(title: str, rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(row[c])) for row in rows)) for c in columns]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths)))
    print()
