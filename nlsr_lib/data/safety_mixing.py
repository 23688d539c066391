"""Safety-data mixing: safe (refusal) rows put into the user's fine-tuning mixture (spec/defences.md §6).

The input is a mixture as :func:`nlsr_lib.data.mixing.poisoned_mixture` builds it: records ``{instruction, input,
output, flag}`` with ``flag`` = ``"unsafe"`` (harmful), ``"finetune"`` (benign task rows) or ``"safe"``. The safe
rows are the **first** ``k`` rows of ``safe_pool`` in pool order (so safe subsets are nested across g, like the
harmful ones across p), formatted like the mixture's rows (Alpaca prompt in ``instruction``, flag ``"safe"``).
Modes (D-M1):

| mode        | safe rows ``k``                        | effect          | total  | source            |
| ----------- | -------------------------------------- | --------------- | ------ | ----------------- |
| ``replace`` | ``⌊n·g⌋`` (``fraction`` g, default 0.1) | replace benign  | n      | NLSR (default)    |
| ``append``  | ``count`` if given, else ``⌊n·g⌋``      | added           | n + k  | Vaccine; Bianchi  |
| ``count``   | ``count`` (absolute)                   | replace benign  | n      | Lisa              |

Replaced benign rows are the **last** ``k`` benign rows in the given order: for benign rows in task-pool order this
keeps the first ``n − ⌊n·p⌋ − k`` task rows (as NLSR's ``merge_vlguard_data.py`` and Lisa's
``normal_num``); for an already shuffled mixture the choice follows that seeded shuffle. Harmful rows are never
touched, so their identity and their nesting across p are those of the unmixed mixture. The result is shuffled
with ``random.Random(seed)`` (D-M2), so it is a pure function of its arguments. Booster's ``joint_loss`` variant
(λ·f on a separate alignment batch at every step) is a training option, not a data mix, and is not handled here.
The pool must be disjoint from the alignment-stage rows (D-M1); the caller slices it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nlsr_lib.data.mixing import _finetune_record, count as floor_count

MODES = ("replace", "append", "count")
FRACTION = 0.1
"""g default (D-M1, NLSR ``merge_vlguard_data.py``); Vaccine ``guide_data_num`` 100 and Lisa use absolute counts."""
HARMFUL, SAFE, BENIGN = "unsafe", "safe", "finetune"
FLAGS = {HARMFUL: "harmful", SAFE: "safe", BENIGN: "benign"}


def _check_mode(mode: str) -> None:
    if mode == "joint_loss":
        raise ValueError("mode 'joint_loss' (Booster, spec/defences.md §6 D-M1) adds λ·f on a separate alignment "
                         f"batch during training; it is not a data mix. Allowed here: {', '.join(MODES)}")
    if mode not in MODES:
        raise ValueError(f"unknown safety-mixing mode {mode!r}; allowed: {', '.join(MODES)}")


def _check_fraction(fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"safety-mixing fraction g must be a number in [0, 1), got {fraction!r} "
                         f"(default {FRACTION}; use mode='count' or 'append' with count= for an absolute number)")


def _check_count(count: Any, mode: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"safety-mixing mode {mode!r}: count must be an integer >= 0 (the number of safe rows), "
                         f"got {count!r}")


def mixture_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{harmful, safe, benign}``: rows by flag (``unsafe``, ``safe``, ``finetune``); other flags are an error."""
    out = {name: 0 for name in FLAGS.values()}
    for i, row in enumerate(rows):
        flag = row.get("flag") if isinstance(row, Mapping) else None
        if flag not in FLAGS:
            raise ValueError(f"mixture row {i} has flag {flag!r}; allowed: {', '.join(map(repr, FLAGS))} "
                             "(records of nlsr_lib.data.mixing.poisoned_mixture)")
        out[FLAGS[flag]] += 1
    return out


def safe_row_count(n: int, *, mode: str = "replace", fraction: float = FRACTION, count: int | None = None) -> int:
    """The number k of safe rows a mix adds to a mixture of n rows (the table of the module docstring)."""
    _check_mode(mode)
    _check_fraction(fraction)
    if mode == "count":
        if count is None:
            raise ValueError("safety-mixing mode 'count' needs count= (the absolute number of safe rows)")
        _check_count(count, mode)
        return count
    if count is not None:
        if mode == "replace":
            raise ValueError("safety-mixing mode 'replace' takes fraction= (⌊n·g⌋ rows); for an absolute number of "
                             "rows replacing benign ones use mode='count'")
        _check_count(count, mode)
        return count
    return floor_count(n, fraction)


def _safe_record(row: Any, index: int, alpaca_format: bool) -> dict[str, Any]:
    if not isinstance(row, Mapping) or "instruction" not in row or "output" not in row:
        raise ValueError(f"safe pool row {index} must be a mapping with 'instruction' and 'output' (and optionally "
                         f"'input'), got {row!r:.120}")
    if alpaca_format:
        return _finetune_record(row["instruction"], row.get("input", ""), row["output"], SAFE)
    return {**row, "flag": SAFE}


def mix_safety(user_rows: Sequence[Mapping[str, Any]], safe_pool: Sequence[Mapping[str, Any]], *,
               mode: str = "replace", fraction: float = FRACTION, count: int | None = None, seed: int = 42,
               alpaca_format: bool = True) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Put k safe rows into the mixture ``user_rows`` (spec/defences.md §6, D-M1, D-M2): ``(rows, counts)``.

    ``replace``: k = ⌊n·g⌋ safe rows replace the last k benign rows; ``append``: k rows are added (k = ``count``
    or ⌊n·g⌋); ``count``: k = ``count`` rows replace benign rows. Harmful rows are kept as they are. Safe rows are
    ``safe_pool[:k]``, in the Alpaca record format unless ``alpaca_format=False`` (then copied, flag set). The
    output is shuffled with ``random.Random(seed)``; ``counts`` = ``{harmful, safe, benign}`` of the output."""
    before = mixture_counts(user_rows)
    if not user_rows:
        raise ValueError("safety mixing needs a non-empty fine-tuning mixture (user_rows)")
    k = safe_row_count(len(user_rows), mode=mode, fraction=fraction, count=count)
    if k > len(safe_pool):
        raise ValueError(f"safety mixing ({mode}) asks for {k} safe rows but the safe pool has only {len(safe_pool)}")
    if mode in ("replace", "count") and k > before["benign"]:
        raise ValueError(f"safety mixing ({mode}) replaces {k} benign rows but the mixture has only "
                         f"{before['benign']} benign rows (flag {BENIGN!r}); lower the fraction/count or use "
                         "mode='append'")
    safe = [_safe_record(row, i, alpaca_format) for i, row in enumerate(safe_pool[:k])]
    drop = k if mode in ("replace", "count") else 0
    benign_seen, benign_keep = 0, before["benign"] - drop
    rows: list[dict[str, Any]] = []
    for row in user_rows:
        if row["flag"] == BENIGN:
            benign_seen += 1
            if benign_seen > benign_keep:
                continue
        rows.append(dict(row))
    rows += safe
    random.Random(seed).shuffle(rows)
    return rows, mixture_counts(rows)


__all__ = ["FLAGS", "FRACTION", "MODES", "mix_safety", "mixture_counts", "safe_row_count"]
