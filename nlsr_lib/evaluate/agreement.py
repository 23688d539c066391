"""Agreement between two raters (a judge and people, or two judges): Cohen's κ and what to report with it
(spec/evaluation.md §2.6).

    κ = (p_o − p_e) / (1 − p_e),   p_o = Σ_c M[c][c] / n,   p_e = Σ_c p_a(c)·p_b(c)

with ``M`` the confusion matrix (rows: rater a, columns: rater b) and ``p_a``, ``p_b`` the raters' label shares. κ is
unweighted, for binary and multi-class labels alike, and NaN when p_e = 1 (both raters give one and the same label to
every item: agreement 100%, κ undefined). Reported with it (§2.6): n, raw agreement p_o, the confusion matrix, per-class
precision and recall of rater a with rater b as the reference, the bias (a's positive rate − b's, in points, for binary
labels) and a seeded 1,000-resample percentile bootstrap 95% CI.

Hand example (§2.6; a = judge, b = human, 100 items): 40 both harmful, 5 judge-only, 10 human-only, 45 both safe →
p_o = 0.85, p_e = 0.45·0.5 + 0.55·0.5 = 0.50, κ = 0.70, bias = −5 points.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT, SEED = 1000, 0
#: the label taken as "positive" (harmful) for the bias when the labels are binary and no ``positive`` is given
POSITIVE_LABELS: tuple[Hashable, ...] = (1, "harmful", "unsafe", "refusal")


@dataclass(frozen=True)
class Agreement:
    """Cohen's κ of rater a against rater b and its companions (spec §2.6). ``confusion[i][j]`` counts items a
    labelled ``labels[i]`` and b labelled ``labels[j]``; ``per_class[label] = {"precision", "recall", "support"}``
    (support: b's count); ``bias`` in points, None unless binary with a known positive label."""

    kappa: float
    n: int
    agreement: float
    expected: float
    labels: tuple[Hashable, ...]
    confusion: tuple[tuple[int, ...], ...]
    per_class: dict[Hashable, dict[str, float]]
    bias: float | None
    positive: Hashable | None
    ci_lo: float
    ci_hi: float
    n_boot: int
    seed: int


def label_order(*label_lists: Sequence[Hashable]) -> tuple[Hashable, ...]:
    """The labels seen in any list, sorted where they sort (else in first-seen order)."""
    seen = tuple(dict.fromkeys(itertools.chain(*label_lists)))
    try:
        return tuple(sorted(seen))
    except TypeError:
        return seen


def kappa_from_confusion(confusion: np.ndarray) -> tuple[float, float, float]:
    """(κ, p_o, p_e) of a k×k count matrix (rows a, columns b): the equation of the module docstring."""
    n = confusion.sum()
    p_o = float(np.trace(confusion) / n)
    p_e = float(np.dot(confusion.sum(axis=1) / n, confusion.sum(axis=0) / n))
    kappa = math.nan if 1.0 - p_e <= 1e-12 else (p_o - p_e) / (1.0 - p_e)
    return kappa, p_o, p_e


def _codes(a: Sequence[Hashable], b: Sequence[Hashable], labels: tuple[Hashable, ...]) -> tuple[np.ndarray, ...]:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[x] for x in a], dtype=np.int64), np.array([index[x] for x in b], dtype=np.int64)


def _confusion(ca: np.ndarray, cb: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(ca * k + cb, minlength=k * k).reshape(k, k)


def bootstrap_kappa(ca: np.ndarray, cb: np.ndarray, k: int, n_boot: int = N_BOOT, seed: int = SEED,
                    chunk: int = 100) -> tuple[float, float]:
    """Percentile 95% CI of κ over ``n_boot`` resamples of the items with replacement (numpy Generator seeded with
    ``seed``); resamples where κ is undefined are left out; (NaN, NaN) when none is defined or ``n_boot`` is 0."""
    rng, n, kappas = np.random.default_rng(seed), len(ca), []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))
        cells = (ca[idx] * k + cb[idx]) + (np.arange(rows)[:, None] * k * k)
        counts = np.bincount(cells.ravel(), minlength=rows * k * k).reshape(rows, k, k)
        kappas.extend(kappa_from_confusion(m)[0] for m in counts)
    defined = np.array([x for x in kappas if not math.isnan(x)])
    if defined.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(defined, [2.5, 97.5])
    return float(lo), float(hi)


def _per_class(confusion: np.ndarray, labels: tuple[Hashable, ...]) -> dict[Hashable, dict[str, float]]:
    """Precision M[c][c]/Σ_j M[c][j] (of a's calls) and recall M[c][c]/Σ_i M[i][c] (of b's), NaN when empty."""
    rows, cols = confusion.sum(axis=1), confusion.sum(axis=0)
    return {label: {"precision": float(confusion[i, i] / rows[i]) if rows[i] else math.nan,
                    "recall": float(confusion[i, i] / cols[i]) if cols[i] else math.nan,
                    "support": int(cols[i])} for i, label in enumerate(labels)}


def _positive(labels: tuple[Hashable, ...], positive: Hashable | None) -> Hashable | None:
    """The positive label for the bias: ``positive`` if given, else the one of :data:`POSITIVE_LABELS` among
    binary labels; None for multi-class labels."""
    if positive is not None:
        return positive
    if len(labels) > 2:
        return None
    known = [label for label in labels if label in POSITIVE_LABELS]
    return known[0] if len(known) == 1 else None


def _check(a: Sequence[Hashable], b: Sequence[Hashable]) -> None:
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs one label of each rater per item: got {len(a)} and {len(b)} labels")
    if not a:
        raise ValueError("cohen_kappa of no items is undefined")
    if any(x is None for x in itertools.chain(a, b)):
        raise ValueError("cohen_kappa got None (an unparsed item); drop the items either rater left unparsed "
                         "first (pairwise_kappas does) and report how many")


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable], positive: Hashable | None = None,
                n_boot: int = N_BOOT, seed: int = SEED) -> Agreement:
    """Unweighted Cohen's κ of rater ``a`` against rater ``b`` with n, p_o, the confusion matrix, per-class
    precision/recall, bias = 100·(p_a(positive) − p_b(positive)) and a seeded bootstrap 95% CI (spec §2.6)."""
    _check(a, b)
    labels = label_order(a, b)
    ca, cb = _codes(a, b, labels)
    confusion = _confusion(ca, cb, len(labels))
    kappa, p_o, p_e = kappa_from_confusion(confusion)
    pos = _positive(labels, positive)
    bias = None
    if pos is not None:
        bias = 100.0 * (sum(x == pos for x in a) - sum(x == pos for x in b)) / len(a)
    ci_lo, ci_hi = bootstrap_kappa(ca, cb, len(labels), n_boot, seed)
    return Agreement(kappa=kappa, n=len(a), agreement=p_o, expected=p_e, labels=labels,
                     confusion=tuple(tuple(int(x) for x in row) for row in confusion),
                     per_class=_per_class(confusion, labels), bias=bias, positive=pos, ci_lo=ci_lo, ci_hi=ci_hi,
                     n_boot=n_boot, seed=seed)


def pairwise_kappas(labels_by_judge: Mapping[str, Sequence[Hashable | None]], n_boot: int = N_BOOT,
                    seed: int = SEED) -> list[dict]:
    """κ for every pair of judges (in the mapping's order), each on the items both judged (``None`` = unparsed,
    skipped): rows ``{judge_a, judge_b, kappa, agreement, n, skipped, ci_lo, ci_hi}``; n = 0 gives NaNs."""
    lengths = {name: len(labels) for name, labels in labels_by_judge.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every judge must label the same items; got lengths {lengths}")
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(labels_by_judge.items(), 2):
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        row = {"judge_a": name_a, "judge_b": name_b, "kappa": math.nan, "agreement": math.nan, "n": len(pairs),
               "skipped": len(a) - len(pairs), "ci_lo": math.nan, "ci_hi": math.nan}
        if pairs:
            result = cohen_kappa([x for x, _ in pairs], [y for _, y in pairs], n_boot=n_boot, seed=seed)
            row.update(kappa=result.kappa, agreement=result.agreement, ci_lo=result.ci_lo, ci_hi=result.ci_hi)
        rows.append(row)
    return rows


__all__ = [
    "N_BOOT",
    "POSITIVE_LABELS",
    "SEED",
    "Agreement",
    "bootstrap_kappa",
    "cohen_kappa",
    "kappa_from_confusion",
    "label_order",
    "pairwise_kappas",
]
