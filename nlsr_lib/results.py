"""Result tables the README quotes: ``results/<profile>/NN_name.json`` (flat records) + a Markdown copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .paths import results_dir
from .runs import atomic_write_json, atomic_write_text


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not records:
        raise ValueError("cannot render an empty result table")
    columns = list(columns or records[0].keys())

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_results(records: Sequence[dict[str, Any]], name: str, profile: str,
                  columns: Sequence[str] | None = None) -> Path:
    """Write ``name``.json (all fields) and ``name``.md (``columns``) under ``results/<profile>/``."""
    out = results_dir(profile)
    path = out / f"{name}.json"
    atomic_write_json(path, list(records))
    atomic_write_text(out / f"{name}.md", markdown_table(records, columns))
    return path


def read_results(name: str, profile: str) -> list[dict[str, Any]]:
    return json.loads((results_dir(profile) / f"{name}.json").read_text())
