"""Alignment-data builders and safety-evaluation prompt selection (spec nlsr.md §2.1, §6.1).

Every builder takes hub-schema rows (a ``datasets.Dataset`` or any sequence of mappings) in dataset order and
returns plain records, exactly as the reference scripts ``BeaverTails_safe.py``, ``BeaverTails_preference.py``
and ``BeaverTails_kto.py`` do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from datasets import Dataset

from nlsr_lib.data.templates import moderation_text
from nlsr_lib.data.schemas import HARM_CATEGORIES

Rows = Dataset | Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]]


def _rows(data: Rows, columns: Sequence[str]) -> Iterator[Mapping[str, Any]]:
    """Iterate rows in dataset order, reading only ``columns``; a missing column is a ValueError naming it."""
    if isinstance(data, Dataset):
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise ValueError(f"dataset lacks column(s) {missing}; it has {data.column_names}")
        for batch in data.select_columns(list(columns)).iter(batch_size=1024):  # columnar: much faster than rows
            yield from (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))
        return
    for i, row in enumerate(data):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"row {i} lacks column(s) {missing}; it has {sorted(row)}")
        yield row


def _check_count(n: int, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} = {n!r}; allowed: an integer >= 0")


def build_safe_sft(beavertails_train: Rows, n: int = 2000, *, strict: bool = True) -> list[dict[str, str]]:
    """SFT safety data (spec nlsr.md §2.1, ``BeaverTails_safe.py``).

    Dataset order, rows with ``is_safe == True``, the first ``n``; record ``{instruction: prompt, input: "",
    output: response}``. With ``strict`` (default) fewer than ``n`` passing rows is a ValueError; otherwise all
    passing rows are returned.
    """
    _check_count(n, "n")
    out: list[dict[str, str]] = []
    for row in _rows(beavertails_train, ("prompt", "response", "is_safe")):
        if len(out) == n:
            break
        if row["is_safe"]:
            out.append({"instruction": row["prompt"], "input": "", "output": row["response"]})
    if strict and len(out) < n:
        raise ValueError(
            f"build_safe_sft: only {len(out)} rows pass the filter is_safe == True, but n = {n} were requested"
        )
    return out


def build_preference_pairs(saferlhf_train: Rows, n: int = 2000, *, strict: bool = True) -> list[dict[str, str]]:
    """Preference data for DPO/ORPO/SimPO (spec nlsr.md §2.1, ``BeaverTails_preference.py``).

    PKU-SafeRLHF rows in dataset order with exactly one safe response (``is_response_0_safe XOR
    is_response_1_safe``), the first ``n``; ``chosen`` = the safe response, ``rejected`` = the unsafe one.
    ``safer_response_id``/``better_response_id`` are not used. ``strict`` as in ``build_safe_sft``.
    """
    _check_count(n, "n")
    cols = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")
    out: list[dict[str, str]] = []
    for row in _rows(saferlhf_train, cols):
        if len(out) == n:
            break
        safe0, safe1 = bool(row["is_response_0_safe"]), bool(row["is_response_1_safe"])
        if safe0 == safe1:
            continue
        chosen, rejected = (row["response_0"], row["response_1"]) if safe0 else (row["response_1"], row["response_0"])
        out.append({"instruction": row["prompt"], "input": "", "chosen": chosen, "rejected": rejected})
    if strict and len(out) < n:
        raise ValueError(
            f"build_preference_pairs: only {len(out)} rows pass the filter "
            f"is_response_0_safe XOR is_response_1_safe, but n = {n} were requested"
        )
    return out


def build_kto(
    saferlhf_train: Rows, n_safe: int = 1000, n_unsafe: int = 1000, *, strict: bool = True
) -> list[dict[str, Any]]:
    """KTO data (spec nlsr.md §2.1, ``BeaverTails_kto.py``): at most one record per pair, first matching rule.

    (1) r0 safe and safe quota open -> (r0, True); (2) r1 safe and safe quota open -> (r1, True);
    (3) r0 unsafe and unsafe quota open -> (r0, False); (4) r1 unsafe and unsafe quota open -> (r1, False);
    else skip. Stops once both quotas are full. Record ``{instruction, input: "", output, label}``. With
    ``strict`` (default) an unfilled quota is a ValueError stating both quotas and what was found.
    """
    _check_count(n_safe, "n_safe")
    _check_count(n_unsafe, "n_unsafe")
    cols = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")
    out: list[dict[str, Any]] = []
    n_true = n_false = 0
    for row in _rows(saferlhf_train, cols):
        if n_true == n_safe and n_false == n_unsafe:
            break
        safe = (bool(row["is_response_0_safe"]), bool(row["is_response_1_safe"]))
        pick: tuple[int, bool] | None = None
        for idx, label in ((0, True), (1, True), (0, False), (1, False)):
            quota_open = n_true < n_safe if label else n_false < n_unsafe
            if safe[idx] == label and quota_open:
                pick = (idx, label)
                break
        if pick is None:
            continue
        idx, label = pick
        n_true += label
        n_false += not label
        out.append({"instruction": row["prompt"], "input": "", "output": row[f"response_{idx}"], "label": label})
    if strict and (n_true < n_safe or n_false < n_unsafe):
        raise ValueError(
            f"build_kto: found {n_true} safe and {n_false} unsafe responses, but quotas n_safe = {n_safe} "
            f"and n_unsafe = {n_unsafe} were requested"
        )
    return out


def safety_eval_prompts(beavertails_test: Rows, start: int, end: int) -> list[str]:
    """Safety-evaluation prompts (spec nlsr.md §6.1): unsafe rows in dataset order, slice ``[start, end)``.

    The index counts only rows with ``is_safe == False`` (test = [0, 1000), EXPO validation = [1000, 1500) in
    the paper). A slice past the available unsafe rows is a ValueError naming both numbers.
    """
    _check_count(start, "start")
    _check_count(end, "end")
    if end < start:
        raise ValueError(f"safety_eval_prompts: end = {end} is before start = {start}")
    prompts = [row["prompt"] for row in _rows(beavertails_test, ("prompt", "is_safe")) if not row["is_safe"]]
    if end > len(prompts):
        raise ValueError(
            f"safety_eval_prompts: slice [{start}, {end}) needs {end} rows with is_safe == False, "
            f"but only {len(prompts)} exist"
        )
    return prompts[start:end]


def moderation_examples(beavertails_split: Rows) -> list[dict[str, Any]]:
    """Labelled examples for the moderation classifier (spec nlsr.md §6.1, synthetic_world.md §3).

    ``text`` = the beaver-dam input ``moderation_text(prompt, response)``; ``labels`` = the 14 category flags
    as floats in ``HARM_CATEGORIES`` order (multi-label targets).
    """
    out: list[dict[str, Any]] = []
    for row in _rows(beavertails_split, ("prompt", "response", "category")):
        category = row["category"]
        missing = [name for name in HARM_CATEGORIES if name not in category]
        if missing:
            raise ValueError(f"category struct lacks {missing}; expected the 14 names of HARM_CATEGORIES")
        out.append(
            {
                "text": moderation_text(row["prompt"], row["response"]),
                "labels": [float(bool(category[name])) for name in HARM_CATEGORIES],
            }
        )
    return out
