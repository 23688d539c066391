"""Real-data loaders: a hub id or a local copy, mapped onto the hub schema (DESIGN.md §3, spec nlsr.md §2).

``load_dataset_source(name, source, split)`` is the single entry point. ``source`` is

* an existing local path (takes precedence over a hub id of the same spelling):
  * a directory written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or
  * a file: ``.json`` (a list of records), ``.jsonl``, ``.csv``, ``.tsv`` or ``.parquet``;
* otherwise a hub id, passed to ``datasets.load_dataset`` (with config ``"main"`` for ``gsm8k``).

Local files are mapped to the hub schema: SST-2 TSV (``sentence<TAB>label`` header) gains ``idx``; AG News TSV
(no header, string labels) gets integer labels; a LLaMA-Factory ranking file ``{prompt, response: [chosen,
rejected]}`` becomes PKU-SafeRLHF rows (response_0 = chosen, safe; response_1 = rejected, unsafe; both ids 0).
The result's columns are validated against ``EXPECTED_COLUMNS``.

A file is one split: for files ``split`` is not used. For hub ids and ``save_to_disk`` directories, ``split``
selects one split (a ``Dataset`` is returned); without it the whole ``DatasetDict`` is returned.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from nlsr_lib.data.tasks import AG_NEWS_LABELS, SST2_LABELS
from nlsr_lib.data.schemas import ALPACA, BEAVERTAILS, SAFERLHF, SCHEMAS

HUB_IDS: dict[str, str] = {
    "beavertails": BEAVERTAILS,
    "pku_saferlhf": SAFERLHF,
    "sst2": "sst2",
    "ag_news": "ag_news",
    "gsm8k": "gsm8k",
    "alpaca": ALPACA,
}
"""Default hub id of each dataset name."""

HUB_CONFIGS: dict[str, str] = {"gsm8k": "main"}
"""Hub configuration passed to ``load_dataset`` for names that need one."""

EXPECTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "beavertails": ("prompt", "response", "category", "is_safe"),
    "pku_saferlhf": ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                     "better_response_id", "safer_response_id"),  # fmt: skip
    "sst2": ("idx", "sentence", "label"),
    "ag_news": ("text", "label"),
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "input", "output"),
}
"""Columns every loaded dataset of a name must have (the hub schema; extra columns are kept)."""

FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".tsv", ".parquet")

_LABEL_WORDS: dict[str, tuple[str, ...]] = {"sst2": SST2_LABELS, "ag_news": AG_NEWS_LABELS}


def _check_name(name: str) -> None:
    if name not in HUB_IDS:
        raise ValueError(f"unknown dataset name {name!r}; allowed: {', '.join(HUB_IDS)}")


def load_dataset_source(name: str, source: str | Path, split: str | None = None) -> Dataset | DatasetDict:
    """Load dataset ``name`` from ``source`` (hub id or local path) in the hub schema; see the module docstring."""
    _check_name(name)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            loaded = _load_saved(path, split)
        else:
            loaded = _load_file(name, path)
    elif isinstance(source, Path) or str(source).startswith(("/", "./", "../", "~")) or path.suffix in FILE_SUFFIXES:
        raise FileNotFoundError(f"{name}: local source {str(source)!r} does not exist")
    else:
        config = HUB_CONFIGS.get(name)
        args = (str(source), config) if config else (str(source),)
        loaded = datasets.load_dataset(*args, split=split)
    validate_columns(name, loaded, str(source))
    return loaded


def _load_saved(path: Path, split: str | None) -> Dataset | DatasetDict:
    """A ``save_to_disk`` directory; ``split`` picks one split of a DatasetDict."""
    loaded = datasets.load_from_disk(str(path))
    if split is None or isinstance(loaded, Dataset):
        return loaded
    if split not in loaded:
        raise ValueError(f"{path}: split {split!r} not found; available: {', '.join(loaded)}")
    return loaded[split]


def _load_file(name: str, path: Path) -> Dataset:
    """Read one local file and map it to the hub schema of ``name``."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json source must hold a list of records, found {type(records).__name__}")
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    elif suffix in (".csv", ".tsv"):
        records = _read_delimited(name, path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        allowed = ", ".join(FILE_SUFFIXES)
        raise ValueError(f"{path}: file type {suffix or '(none)'!r} is not supported; allowed: {allowed}")
    return to_hub_schema(name, records, str(path))


def _read_delimited(name: str, path: Path, delimiter: str) -> list[dict[str, Any]]:
    """CSV/TSV rows as dicts; a first row equal to known column names is a header, otherwise (SST-2/AG News
    only) the columns are ``(sentence|text, label)``."""
    with path.open(encoding="utf-8", newline="") as fh:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        rows = [r for r in csv.reader(fh, delimiter=delimiter, quoting=quoting) if r]
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    has_header = bool(set(header) & set(EXPECTED_COLUMNS[name])) or name not in ("sst2", "ag_news")
    if has_header:
        body, columns, first_line = rows[1:], header, 2
    else:
        body, columns, first_line = rows, ["sentence" if name == "sst2" else "text", "label"], 1
    out = []
    for i, r in enumerate(body):
        if len(r) != len(columns):
            raise ValueError(
                f"{path}: row {i + first_line} has {len(r)} fields, expected {len(columns)} ({columns})"
            )
        out.append(dict(zip(columns, r)))
    return out


def _label_id(name: str, value: Any, where: str) -> int:
    """Integer class id from an int, a digit string or a label word (spec nlsr.md §2.3 label formats)."""
    words = _LABEL_WORDS[name]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(words):
        return value
    text = str(value).strip()
    if text.isdigit() and int(text) < len(words):
        return int(text)
    if text in words:
        return words.index(text)
    allowed = f"{list(range(len(words)))} or {list(words)}"
    raise ValueError(f"{where}: {name} label {value!r} is not allowed; allowed: {allowed}")


def _ranking_to_saferlhf(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """LLaMA-Factory ranking record ``{prompt, response: [chosen, rejected]}`` -> PKU-SafeRLHF row."""
    response = record["response"]
    if not isinstance(response, list) or len(response) != 2:
        raise ValueError(f"{where}: ranking 'response' must be [chosen, rejected], found {response!r:.80}")
    return {
        "prompt": record["prompt"],
        "response_0": response[0],
        "response_1": response[1],
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "better_response_id": 0,
        "safer_response_id": 0,
    }


def to_hub_schema(name: str, records: list[Mapping[str, Any]], where: str = "records") -> Dataset:
    """Map local records of dataset ``name`` to its hub schema and build a Dataset (features as in ``SCHEMAS``)."""
    _check_name(name)
    rows = [dict(r) for r in records]
    if name == "pku_saferlhf" and rows and "response" in rows[0] and "response_0" not in rows[0]:
        rows = [_ranking_to_saferlhf(r, where) for r in rows]
    if name in _LABEL_WORDS:
        for i, r in enumerate(rows):
            if "label" in r:
                r["label"] = _label_id(name, r["label"], f"{where} row {i}")
    if name == "sst2":
        for i, r in enumerate(rows):
            r.setdefault("idx", i)
            r["idx"] = int(r["idx"])
    if name == "alpaca":
        for r in rows:
            r.setdefault("input", "")
    hub = SCHEMAS[HUB_IDS[name]]
    present = list(dict.fromkeys(k for r in rows for k in r)) if rows else list(EXPECTED_COLUMNS[name])
    columns = [c for c in hub if c in present] + [c for c in present if c not in hub]  # hub order first
    _require(name, columns, where)
    table = {c: [r.get(c) for r in rows] for c in columns}
    features = datasets.Features({c: hub[c] for c in columns}) if all(c in hub for c in columns) else None
    if features is not None:
        return Dataset.from_dict(table, features=features)
    dataset = Dataset.from_dict(table)
    return dataset.cast(datasets.Features({**dataset.features, **{c: hub[c] for c in columns if c in hub}}))


def _require(name: str, columns: list[str], where: str) -> None:
    missing = [c for c in EXPECTED_COLUMNS[name] if c not in columns]
    if missing:
        raise ValueError(
            f"{where}: {name} data lacks column(s) {missing}; expected {list(EXPECTED_COLUMNS[name])}, found {columns}"
        )


def validate_columns(name: str, data: Dataset | DatasetDict, where: str = "dataset") -> None:
    """Check that every split of ``data`` has the hub columns of ``name``; the error names the missing ones."""
    _check_name(name)
    if isinstance(data, DatasetDict):
        for split, ds in data.items():
            _require(name, ds.column_names, f"{where} [{split}]")
    elif isinstance(data, Dataset):
        _require(name, data.column_names, where)
    else:
        raise ValueError(f"{where}: expected a datasets.Dataset or DatasetDict, found {type(data).__name__}")
