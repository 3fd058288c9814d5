"""Rows of dicts -> a markdown table (the format every benchmark prints and records)."""
from __future__ import annotations


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
