"""Intervals over training seeds and evaluation prompts (issue 18).

A table row measured at several training seeds (:mod:`nlsr_lib.seeds`) is reported as

* ``m`` and ``m_sd``: the mean and the sample standard deviation (ddof = 1) over seeds: how much a number moves
  when the model is trained again;
* ``m_lo``, ``m_hi``: a 95 % percentile bootstrap interval over **seeds and prompts** (:func:`bootstrap_interval`,
  the prompts resampled once per resample since every seed answers the same prompts) for the rates measured on a
  known number of prompts (harmful score, empty share, task accuracy): it also covers
  the sampling of the evaluation set, and gives a single-seed row an interval too;
* :func:`prediction_interval`: where one *new* run (a fresh clone, another machine) should land with 95 %
  probability, mean ± t₀.₉₇₅,ₖ₋₁ · sd · √(1 + 1/k) over k seeds (the Student-t prediction interval).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 10_000


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_sd of no values")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def bootstrap_interval(rates: Sequence[float], sizes: Sequence[int], level: float = LEVEL, n_boot: int = N_BOOT,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean rate (%) over seeds and prompts.

    Each resample draws the S seeds with replacement and averages their rates; the prompts, the same at every
    seed, are then resampled once for that average: for a binary outcome (flagged, empty, correct) a rate r on n
    prompts resamples exactly as Binomial(n, r)/n. Drawing the prompt noise once (not once per seed) treats the
    seeds' answers to a prompt as agreeing, the conservative end of shared prompts: three identical seeds (an
    untrained base) get the interval of one, not one √3 narrower. ``n`` is the smallest of ``sizes``."""
    if len(rates) != len(sizes) or not rates:
        raise ValueError(f"bootstrap_interval: {len(rates)} rates and {len(sizes)} sizes; need as many, at least one")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level}: allowed: 0 < level < 1")
    p = np.clip(np.asarray(rates, dtype=np.float64) / 100.0, 0.0, 1.0)
    if min(sizes) < 1:
        raise ValueError(f"bootstrap_interval: sizes {list(sizes)}; every size must be a positive count")
    n = int(min(sizes))
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(p), size=(n_boot, len(p)))
    means = 100.0 * rng.binomial(n, p[picked].mean(axis=1)) / n
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _t_cdf(t: float, df: int) -> float:
    """Student-t CDF by Simpson integration of the density from 0 (accurate to ~1e-10 for the quantiles used)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 4000
    h = abs(t) / steps
    xs = np.linspace(0.0, abs(t), steps + 1)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(xs ** 2 / df))
    weights = np.ones(steps + 1)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    half = float(h / 3.0 * (weights * density).sum())
    return 0.5 + math.copysign(half, t)


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`_t_cdf`)."""
    if df < 1 or not 0.5 <= q < 1.0:
        raise ValueError(f"t_quantile(q={q}, df={df}): allowed: 0.5 <= q < 1, df >= 1")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(80):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2.0


def prediction_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Where one new draw lands with probability ``level``: mean ± t · sd · √(1 + 1/k) over k ≥ 2 values."""
    if len(values) < 2:
        raise ValueError(f"a prediction interval needs at least 2 seeds, got {len(values)}")
    mean, sd = mean_sd(values)
    half = t_quantile(0.5 + level / 2.0, len(values) - 1) * sd * math.sqrt(1.0 + 1.0 / len(values))
    return mean - half, mean + half


# --------------------------------------------------------------------------------------------- tables
def size_field(metric: str) -> str | None:
    """The record field holding the number of prompts a rate was measured on: ``n_prompts`` for the safety rates,
    ``n_task`` for a single task's accuracy, ``n_task_<task>`` for ``accuracy_<task>``, ``n_over_refusal`` (the safe
    prompts) for ``over_refusal``, ``n_capability_<task>`` for ``capability_<task>``; None for a derived number (a
    mean over tasks, a similarity), which gets the seeds' sd only."""
    if metric in ("harmful_score", "empty"):
        return "n_prompts"
    if metric == "over_refusal" or metric.startswith("capability_"):
        return "n_" + metric
    if metric in ("accuracy", "accuracy_strict"):
        return "n_task"
    if metric.startswith("accuracy_"):
        return "n_task_" + metric.removeprefix("accuracy_")
    return None


def aggregate(records: Iterable[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str],
              sizes: Callable[[str], str | None] = size_field, level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per group of ``by`` (in first-seen order) over its seeds' records: each metric's mean ``m``,
    ``m_sd`` and, where :func:`size_field` names a count in the records, the bootstrap interval ``m_lo``/``m_hi``;
    ``seeds`` and ``n_seeds`` (``m_n_seeds`` where a metric was measured at fewer of the group's seeds). Other fields are kept where the group agrees on them, else listed per seed (e.g. the
    α chosen at each seed)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        if "seed" not in record:
            raise ValueError(f"record without a 'seed' field cannot be aggregated over seeds: {dict(record)}")
        groups.setdefault(tuple(record.get(k) for k in by), []).append(record)
    rows = []
    for key, group in groups.items():
        seeds = [r["seed"] for r in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"group {dict(zip(by, key))} has seeds {seeds}: one record per seed expected")
        row: dict[str, Any] = dict(zip(by, key))
        for name in dict.fromkeys(k for r in group for k in r):
            if name in row or name in metrics or name == "seed":
                continue
            values = [r.get(name) for r in group]
            row[name] = values[0] if all(v == values[0] for v in values) else values
        for metric in metrics:
            measured = [r for r in group if r.get(metric) is not None]
            if not measured:
                continue
            mean, sd = mean_sd([r[metric] for r in measured])
            row[metric], row[f"{metric}_sd"] = mean, sd
            if len(measured) < len(group):
                row[f"{metric}_n_seeds"] = len(measured)
            count = sizes(metric)
            if count and all(r.get(count) for r in measured):
                row[f"{metric}_lo"], row[f"{metric}_hi"] = bootstrap_interval(
                    [r[metric] for r in measured], [r[count] for r in measured], level)
        row["seeds"], row["n_seeds"] = sorted(seeds), len(seeds)
        rows.append(row)
    return rows


def format_cell(record: Mapping[str, Any], column: str, digits: int = 2) -> str | None:
    """``mean ± sd`` for a metric over several seeds, ``value [lo, hi]`` for one seed with a bootstrap interval,
    None when the column carries no interval."""
    value = record.get(column)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if record.get(f"{column}_n_seeds", record.get("n_seeds", 1)) > 1 and f"{column}_sd" in record:
        return f"{value:.{digits}f} ± {record[f'{column}_sd']:.{digits}f}"
    if f"{column}_lo" in record:
        return f"{value:.{digits}f} [{record[f'{column}_lo']:.1f}, {record[f'{column}_hi']:.1f}]"
    return None


__all__ = ["LEVEL", "aggregate", "bootstrap_interval", "format_cell", "mean_sd", "prediction_interval",
           "size_field", "t_quantile"]
