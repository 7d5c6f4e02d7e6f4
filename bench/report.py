"""Shared by the bench scripts: one plain-text table format."""

from __future__ import annotations

import json
import os
from pathlib import Path


def print_table(title: str, rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(row[c])) for row in rows)) for c in columns]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(columns, widths)))
    print()


def write_json(name: str, results: dict) -> Path:
    """$OUT/<name>.json when OUT is set (the GPU machine's fetched folder), else bench/results/."""
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return path
