"""Poisoned fine-tuning mixtures (spec nlsr.md §2.4; DESIGN.md §6 "mixing").

``poisoned_mixture(task_rows, beavertails_train, task, n, p)`` reproduces ``merge_data.py``:

* harmful = the first ``⌊n·p⌋`` unsafe BeaverTails ``30k_train`` rows in dataset order (flag ``unsafe``), so
  harmful subsets are nested across ratios and identical across tasks;
* benign = the first ``n − ⌊n·p⌋`` rows of the task's train pool in its Alpaca format (flag ``finetune``);
* concatenated, then shuffled with an explicit seed (the reference shuffles unseeded, spec §9.16);
* every record is ``{instruction: alpaca_prompt(instruction, input), input: "", output, flag}``: the
  instruction field already holds the full Alpaca prompt (template ``finetune_llama3``).

Variants: ``extra="safe"`` replaces the harmful rows by the first safe BeaverTails rows (the *clean* control,
``merge_clean_data.py``); safe rows mixed into a poisoned mixture as a defence (``merge_vlguard_data.py`` and
its kin) are :func:`nlsr_lib.data.safety_mixing.mix_safety`. ``⌊n·p⌋`` is computed on ``round(n·p, 9)`` so that binary floating point
(``0.29 · 100 = 28.999…``) cannot drop a row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from nlsr_lib.data.tasks import get_task
from nlsr_lib.data.templates import alpaca_prompt

POISON_RATIOS: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)
FINETUNE_SIZES: tuple[int, ...] = (100, 500, 1000, 2000, 2500)


def count(n: int, ratio: float) -> int:
    """``⌊n·ratio⌋`` robust to floating point (spec §2.4)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio {ratio!r} is outside [0, 1]")
    return math.floor(round(n * ratio, 9))


def _finetune_record(instruction: str, input_: str, output: str, flag: str) -> dict[str, str]:
    return {"instruction": alpaca_prompt(instruction, input_), "input": "", "output": output, "flag": flag}


def beavertails_pool(beavertails_train: Sequence[Mapping[str, Any]], safe: bool) -> list[dict[str, str]]:
    """``BeaverTails_unsafe.json`` (``safe=False``) or ``BeaverTails_safe.json`` (``safe=True``): dataset order."""
    return [{"instruction": r["prompt"], "input": "", "output": r["response"]}
            for r in beavertails_train if bool(r["is_safe"]) == safe]


def poisoned_mixture(task_rows: Sequence[Mapping[str, Any]], beavertails_train: Sequence[Mapping[str, Any]],
                     task: str, n: int = 1000, p: float = 0.1, seed: int = 42,
                     extra: Literal["unsafe", "safe"] = "unsafe") -> list[dict[str, str]]:
    """The fine-tuning set of ``n`` records with ``⌊n·p⌋`` harmful (or safe, for ``extra="safe"``) rows."""
    if n < 1:
        raise ValueError(f"n = {n}; allowed: an integer >= 1")
    if extra not in ("unsafe", "safe"):
        raise ValueError(f"extra = {extra!r}; allowed: 'unsafe' (poisoned) or 'safe' (clean control)")
    spec = get_task(task)
    n_extra = count(n, p)
    n_benign = n - n_extra
    extra_pool = beavertails_pool(beavertails_train, safe=extra == "safe")
    for name, have, need in (("BeaverTails rows with is_safe == " + str(extra == "safe"), len(extra_pool), n_extra),
                             (f"{task} train rows", len(task_rows), n_benign)):
        if have < need:
            raise ValueError(f"poisoned_mixture: {need} {name} are needed but only {have} exist")
    records = [_finetune_record(r["instruction"], r["input"], r["output"], extra) for r in extra_pool[:n_extra]]
    for row in (task_rows[i] for i in range(n_benign)):
        rec = spec.to_record(row)
        records.append(_finetune_record(rec["instruction"], rec["input"], rec["output"], "finetune"))
    random.Random(seed).shuffle(records)
    return records
