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


SUITE_FIELDS = ("benchmark", "wrapper", "judge")
"""The fields that name one cell of the evaluation suite (spec/evaluation.md §2.0: every row names its judge)."""


def suite_metrics(evaluation) -> list[str]:
    """The suite's metrics for an ``EvaluationConfig``: harmful score and empty share per benchmark × judge, and
    the model's over-refusal and capability (%), where configured."""
    return ["harmful_score", "empty", *(["over_refusal"] if evaluation.over_refusal else []),
            *(f"capability_{task}" for task in evaluation.capability)]


def write_suite_results(records: Sequence[dict[str, Any]], name: str, profile: str, by: Sequence[str],
                        evaluation) -> list[dict[str, Any]]:
    """The evaluation suite's table ``name`` (:func:`write_seeded_results` grouped by ``by`` and
    :data:`SUITE_FIELDS`), and ``name``'s judge agreement beside it where given."""
    metrics = suite_metrics(evaluation)
    keys = [*by, *SUITE_FIELDS]
    return write_seeded_results(records, name, profile, by=keys, metrics=metrics, columns=[*keys, *metrics])


def write_agreement(rows: Sequence[dict[str, Any]], name: str, profile: str) -> list[dict[str, Any]]:
    """Cohen's κ between every pair of judges (:func:`nlsr_lib.evaluate.agreement.pairwise_kappas`) as ``name``."""
    columns = ["judge_a", "judge_b", "kappa", "ci_lo", "ci_hi", "agreement", "n"]
    write_results(rows, name, profile, columns=[c for c in columns if c in rows[0]])
    return list(rows)


def api_usage(records: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """An API judge's usage summed over a notebook's suite records (``api_calls``, ``api_cache_hits``, tokens,
    ``api_cost``): what this run asked of the endpoint (cached stages count nothing); None without an API judge."""
    totals: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("api_"):
                totals[key] = totals.get(key, 0) + value
    return totals or None
