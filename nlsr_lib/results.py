"""Result tables the README quotes: ``results/<profile>/NN_name.json`` (flat records) + a Markdown copy.

Tables measured at several training seeds are written by :func:`write_seeded_results`: ``NN_name.json`` holds one
row per group with each metric's mean, ``_sd`` and 95 % interval (:func:`nlsr_lib.intervals.aggregate`),
``NN_name_seeds.json`` the per-seed records it was computed from, and the Markdown shows ``mean ± sd`` (or
``value [lo, hi]`` for a row measured at one seed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .intervals import aggregate, format_cell
from .paths import results_dir
from .runs import atomic_write_json, atomic_write_text


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not records:
        raise ValueError("cannot render an empty result table")
    columns = list(columns or records[0].keys())

    def cell(record: dict[str, Any], column: str) -> str:
        value = record.get(column, "")
        interval = format_cell(record, column)
        if interval is not None:
            return interval
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_results(records: Sequence[dict[str, Any]], name: str, profile: str,
                  columns: Sequence[str] | None = None) -> Path:
    """Write ``name``.json (all fields) and ``name``.md (``columns``) under ``results/<profile>/``."""
    out = results_dir(profile)
    path = out / f"{name}.json"
    atomic_write_json(path, list(records))
    atomic_write_text(out / f"{name}.md", markdown_table(records, columns))
    return path


def write_seeded_results(records: Sequence[dict[str, Any]], name: str, profile: str, by: Sequence[str],
                         metrics: Sequence[str], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Aggregate per-seed ``records`` over seeds by the ``by`` fields (:func:`~nlsr_lib.intervals.aggregate`),
    write ``name``.json (the aggregated rows), ``name``.md (``columns`` plus ``n_seeds``) and ``name``_seeds.json
    (the records as measured); return the aggregated rows."""
    rows = aggregate(records, by, metrics)
    columns = [*(columns or [*by, *metrics]), "n_seeds"]
    write_results(rows, name, profile, columns=columns)
    atomic_write_json(results_dir(profile) / f"{name}_seeds.json", list(records))
    return rows


def read_results(name: str, profile: str) -> list[dict[str, Any]]:
    return json.loads((results_dir(profile) / f"{name}.json").read_text())
