"""Real-data sources: a hub id or a local copy, loaded as a ``DatasetDict`` keyed by split in the hub schema
(DESIGN.md §3, spec nlsr.md §2).

A source (``params.data.sources.<name>``) is one of these forms (:func:`source_form`):

* ``synthetic``: the embedded world (loaded by :func:`nlsr_lib.stages.world.load_source`, not here);
* a directory written by ``save_to_disk`` (a ``DatasetDict``, or a ``Dataset`` for a one-split dataset);
* one file: ``.tsv``, ``.csv``, ``.json`` (a list of records), ``.jsonl`` or ``.parquet``, each optionally
  gzip-compressed (``test.jsonl.gz``). A file is one split, so it serves only a dataset that needs exactly one
  split (``alpaca`` -> ``train``); for the others it is an error naming the splits needed and the mapping syntax;
* a mapping ``{split: file}`` (a YAML mapping), one file of the types above per split the dataset needs
  (:data:`SPLITS`; two splits may name the same file);
* otherwise a hub id, passed to ``datasets.load_dataset`` split by split (config ``"main"`` for ``gsm8k``).

Params resolve relative paths against the folder of the params file that declares them, so this module sees
absolute paths. Here a ``Path``, an absolute path or a value that looks like a path (starts with ``./``, ``../``,
``/`` or ``~``, or ends in a data-file suffix: :func:`looks_local`) is local and must exist (a missing one is an
error, never a hub request); any other string is a hub id (:func:`source_form`).

:func:`load_dataset_source` returns a ``DatasetDict`` for every form, holding exactly the splits of
:data:`SPLITS` (the splits the stages index), so consumers index splits uniformly. Local files are mapped to the
hub schema: SST-2 TSV (``sentence<TAB>label`` header) gains ``idx``; AG News TSV (no header, string labels) gets
integer labels; a LLaMA-Factory ranking file ``{prompt, response: [chosen, rejected]}`` becomes PKU-SafeRLHF rows
(response_0 = chosen, safe; response_1 = rejected, unsafe; both ids 0); Alpaca rows without ``input`` get ``""``.
Every split's columns are validated against :data:`EXPECTED_COLUMNS`.

:func:`check_local_source` is the cheap version for params validation: it reads only a file's header or first
record (a ``save_to_disk`` folder's JSON metadata) and names the source, split, file, the missing columns and the
columns found. This module imports ``datasets`` only when it builds datasets, so ``nlsr_lib.config`` can use it
and stay light.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from nlsr_lib.data.tasks import AG_NEWS_LABELS, SST2_LABELS
from nlsr_lib.errors import NlsrError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

HUB_IDS: dict[str, str] = {
    "beavertails": "PKU-Alignment/BeaverTails",  # = schemas.BEAVERTAILS (literal: this module stays light)
    "pku_saferlhf": "PKU-Alignment/PKU-SafeRLHF-30K",  # = schemas.SAFERLHF
    "sst2": "sst2",
    "ag_news": "ag_news",
    "gsm8k": "gsm8k",
    "alpaca": "tatsu-lab/alpaca",  # = schemas.ALPACA
    "alpaca_eval": "tatsu-lab/alpaca_eval",
}
"""Default hub id of each dataset name."""

HUB_CONFIGS: dict[str, str] = {"gsm8k": "main", "alpaca_eval": "alpaca_eval"}
"""Hub configuration passed to ``load_dataset`` for names that need one."""

SPLITS: dict[str, tuple[str, ...]] = {
    "beavertails": ("30k_train", "30k_test"),  # SFT / poison / tiny judge and pretraining; safety prompts, judge
    "pku_saferlhf": ("train", "test"),  # DPO/ORPO/SimPO/KTO pairs; calibration prompts and the learned mask's pairs
    "sst2": ("train", "validation"),  # tasks.TASKS[...].train_split / eval_split
    "ag_news": ("train", "test"),
    "gsm8k": ("train", "test"),
    "alpaca": ("train",),  # pretraining corpus, set-difference utility data, the Alpaca task's training rows
    "alpaca_eval": ("eval",),  # the Alpaca task's evaluation prompts (items 701–804) and reference answers
}
"""The splits the stages index of each dataset: every source must provide them."""

EXPECTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "beavertails": ("prompt", "response", "category", "is_safe"),
    "pku_saferlhf": ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                     "better_response_id", "safer_response_id"),  # fmt: skip
    "sst2": ("idx", "sentence", "label"),
    "ag_news": ("text", "label"),
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "input", "output"),
    "alpaca_eval": ("instruction", "output"),
}
"""Columns every loaded dataset of a name must have (the hub schema; extra columns are kept)."""

FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
COMPRESSED_SUFFIX = ".gz"
SYNTHETIC = "synthetic"
PATH_PREFIXES: tuple[str, ...] = ("./", "../", "/", "~")

_LABEL_WORDS: dict[str, tuple[str, ...]] = {"sst2": SST2_LABELS, "ag_news": AG_NEWS_LABELS}


class SourceError(NlsrError, ValueError):
    """A data source that cannot serve its dataset; the message names the dataset, split, file and what is allowed."""


class MissingSourceError(SourceError, FileNotFoundError):
    """A source written as a local path that does not exist (it is not sent to the hub)."""


def _check_name(name: str) -> None:
    if name not in HUB_IDS:
        raise ValueError(f"unknown dataset name {name!r}; allowed: {', '.join(HUB_IDS)}")


# --------------------------------------------------------------------------------------------- forms
def file_format(path: str | Path) -> str | None:
    """The data format of a file name (``.tsv`` for ``x.tsv`` and ``x.tsv.gz``), or None if it is not one."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == COMPRESSED_SUFFIX:
        suffixes.pop()
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_SUFFIXES else None


def looks_local(value: str) -> bool:
    """Whether a source string is meant as a local path: it starts with ``./ ../ / ~`` or names a data file."""
    return value.startswith(PATH_PREFIXES) or file_format(value) is not None


def source_form(source: str | Path | Mapping[str, Any]) -> str:
    """``synthetic``, ``mapping``, ``directory``, ``file`` or ``hub``. A ``Path``, an absolute path or a string
    that :func:`looks_local` is local and must exist (else :class:`MissingSourceError`); any other string is a hub
    id, even where the current directory holds a folder of that name (params make every local path absolute; a
    caller who means a folder relative to the current directory writes ``./name``)."""
    if isinstance(source, Mapping):
        return "mapping"
    if source == SYNTHETIC:
        return "synthetic"
    path = Path(source).expanduser()
    if not (isinstance(source, Path) or path.is_absolute() or looks_local(str(source))):
        return "hub"
    if not path.exists():
        raise MissingSourceError(f"local source {str(source)!r} does not exist (looked for {path.absolute()})")
    return "directory" if path.is_dir() else "file"


def _mapping_example(name: str, fmt: str) -> str:
    return "{" + ", ".join(f"{s}: {s}{fmt}" for s in SPLITS[name]) + "}"


def split_files(name: str, source: str | Path | Mapping[str, Any]) -> dict[str, Path]:
    """The file of each split of a file or mapping source, in the order of :data:`SPLITS`. A single file serves a
    dataset that needs one split; a mapping must name exactly the splits needed, each an existing data file."""
    _check_name(name)
    needed = SPLITS[name]
    form = source_form(source)
    if form == "file":
        path = Path(source).expanduser()
        if len(needed) > 1:
            raise SourceError(
                f"{name} needs the splits {', '.join(needed)}, but {path} is one file; map each split to a file "
                f"(two splits may name the same file), e.g. {name}: {_mapping_example(name, _suffix(path))}")
        return {needed[0]: _data_file(name, needed[0], path)}
    if form != "mapping":
        raise ValueError(f"{name}: {source!r} is a {form} source, not a file or a split -> file mapping")
    unknown = [s for s in source if s not in needed]
    missing = [s for s in needed if s not in source]
    if unknown or missing:
        what = f"unknown split(s) {unknown}" if unknown else f"no file for split(s) {missing}"
        raise SourceError(f"{name}: the mapping has {what}; {name} needs exactly the splits {', '.join(needed)} "
                          f"(two splits may name the same file), e.g. {name}: {_mapping_example(name, '.jsonl')}")
    return {split: _data_file(name, split, source[split]) for split in needed}


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix.lower() == COMPRESSED_SUFFIX else path.suffix


def _data_file(name: str, split: str, value: Any) -> Path:
    """An existing file of a supported type for ``split`` of ``name``."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise SourceError(f"{name} split {split!r}: expected the path of a data file, got {value!r}")
    path = Path(value).expanduser()
    if not path.exists():
        raise MissingSourceError(f"{name} split {split!r}: file {str(value)!r} does not exist "
                                 f"(looked for {path.absolute()})")
    if not path.is_file():
        raise SourceError(f"{name} split {split!r}: {path} is a directory; a split maps to one data file "
                          f"({_allowed_types()}); a save_to_disk folder is a whole source, not a split")
    if file_format(path) is None:
        raise SourceError(f"{name} split {split!r}: {path}: file type {_suffix(path) or '(none)'!r} is not "
                          f"supported; allowed: {_allowed_types()}")
    return path


def _allowed_types() -> str:
    return ", ".join(FILE_SUFFIXES) + f" (each optionally {COMPRESSED_SUFFIX})"


# --------------------------------------------------------------------------------------------- loading
def load_dataset_source(name: str, source: str | Path | Mapping[str, Any]) -> DatasetDict:
    """Dataset ``name`` from ``source`` (any form but ``synthetic``; see the module docstring) as a
    ``DatasetDict`` keyed by split in the hub schema, holding exactly the splits of :data:`SPLITS`."""
    _check_name(name)
    form = source_form(source)
    if form == "synthetic":
        raise ValueError(f"{name}: 'synthetic' is the embedded world; load it with nlsr_lib.stages.world.load_source")
    if form == "hub":
        loaded = _load_hub(name, str(source))
    elif form == "directory":
        loaded = _load_saved(name, Path(source).expanduser())
    else:
        from datasets import DatasetDict

        loaded = DatasetDict({split: _load_file(name, path) for split, path in split_files(name, source).items()})
    where = str(source) if form != "mapping" else f"{name} files"
    validate_columns(name, loaded, where)
    return loaded


def _load_hub(name: str, hub_id: str) -> DatasetDict:
    """The needed splits of a hub dataset, one ``load_dataset`` call per split (no other split is prepared)."""
    import datasets

    config = HUB_CONFIGS.get(name)
    args = (hub_id, config) if config else (hub_id,)
    return datasets.DatasetDict({split: datasets.load_dataset(*args, split=split) for split in SPLITS[name]})


def _load_saved(name: str, path: Path) -> DatasetDict:
    """A ``save_to_disk`` folder: a DatasetDict with the needed splits (only they are kept), or a Dataset for a
    one-split dataset."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({_single_split(name, path, "holds one Dataset"): loaded})
    _require_splits(name, list(loaded), path)
    return datasets.DatasetDict({split: loaded[split] for split in SPLITS[name]})  # other splits are not read


def _single_split(name: str, path: Path, what: str) -> str:
    needed = SPLITS[name]
    if len(needed) > 1:
        raise SourceError(f"{name} needs the splits {', '.join(needed)}, but {path} {what}; save a DatasetDict "
                          f"with those splits, or map each split to a file, e.g. "
                          f"{name}: {_mapping_example(name, '.jsonl')}")
    return needed[0]


def _require_splits(name: str, available: list[str], where: Any) -> None:
    missing = [s for s in SPLITS[name] if s not in available]
    if missing:
        raise SourceError(f"{name}: {where} has no split(s) {missing}; {name} needs {', '.join(SPLITS[name])}; "
                          f"available: {', '.join(available) or '(none)'}")


def _open_text(path: Path) -> IO[str]:
    if path.suffix.lower() == COMPRESSED_SUFFIX:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _parquet_file(path: Path) -> Any:
    """A path or (compressed parquet: the file has no random access) an in-memory buffer for pyarrow."""
    if path.suffix.lower() != COMPRESSED_SUFFIX:
        return path
    with gzip.open(path, "rb") as fh:
        return io.BytesIO(fh.read())


def _load_file(name: str, path: Path) -> Dataset:
    """Read one local file (any supported type, optionally gzip-compressed) and map it to the hub schema."""
    fmt = file_format(path)
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(_parquet_file(path)).to_pylist()
    elif fmt is None:
        raise SourceError(f"{path}: file type {_suffix(path) or '(none)'!r} is not supported; allowed: "
                          f"{_allowed_types()}")
    else:
        with _open_text(path) as fh:
            if fmt == ".json":
                records = json.load(fh)
                if not isinstance(records, list):
                    raise SourceError(f"{path}: a .json source must hold a list of records, found "
                                      f"{type(records).__name__}")
            elif fmt == ".jsonl":
                records = [json.loads(line) for line in fh if line.strip()]
            else:
                records = _read_delimited(name, fh, fmt, path)
    return to_hub_schema(name, records, str(path))


def _csv_reader(fh: IO[str], fmt: str) -> Any:
    if fmt == ".tsv":
        return csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(fh, delimiter=",", quoting=csv.QUOTE_MINIMAL)


def _columns_of_first_row(name: str, first: list[str]) -> tuple[list[str], bool]:
    """(columns, whether ``first`` is a header): a first row sharing a name with the hub columns is a header;
    otherwise (SST-2/AG News only) the columns are ``(sentence|text, label)``."""
    header = [c.strip() for c in first]
    if bool(set(header) & set(EXPECTED_COLUMNS[name])) or name not in ("sst2", "ag_news"):
        return header, True
    return ["sentence" if name == "sst2" else "text", "label"], False


def _read_delimited(name: str, fh: IO[str], fmt: str, path: Path) -> list[dict[str, Any]]:
    """CSV/TSV rows as dicts (see :func:`_columns_of_first_row` for the header rule)."""
    rows = [r for r in _csv_reader(fh, fmt) if r]
    if not rows:
        return []
    columns, has_header = _columns_of_first_row(name, rows[0])
    body, first_line = (rows[1:], 2) if has_header else (rows, 1)
    out = []
    for i, r in enumerate(body):
        if len(r) != len(columns):
            raise SourceError(f"{path}: row {i + first_line} has {len(r)} fields, expected {len(columns)} ({columns})")
        out.append(dict(zip(columns, r)))
    return out


# --------------------------------------------------------------------------------------------- hub schema
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


def _is_ranking(name: str, columns: Any) -> bool:
    """A LLaMA-Factory ranking record (``response`` = [chosen, rejected]) given for PKU-SafeRLHF."""
    return name == "pku_saferlhf" and "response" in columns and "response_0" not in columns


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


def mapped_columns(name: str, columns: list[str]) -> list[str]:
    """The columns :func:`to_hub_schema` makes of records with ``columns`` (before the column check)."""
    if _is_ranking(name, columns):
        return list(EXPECTED_COLUMNS[name])
    added = {"sst2": "idx", "alpaca": "input"}.get(name)
    return list(columns) + ([added] if added and added not in columns else [])


def to_hub_schema(name: str, records: list[Mapping[str, Any]], where: str = "records") -> Dataset:
    """Map local records of dataset ``name`` to its hub schema and build a Dataset (features as in ``SCHEMAS``)."""
    import datasets

    from nlsr_lib.data.schemas import SCHEMAS

    _check_name(name)
    rows = [dict(r) for r in records]
    if rows and _is_ranking(name, rows[0]):
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
        return datasets.Dataset.from_dict(table, features=features)
    dataset = datasets.Dataset.from_dict(table)
    return dataset.cast(datasets.Features({**dataset.features, **{c: hub[c] for c in columns if c in hub}}))


def _require(name: str, columns: list[str], where: str) -> None:
    missing = [c for c in EXPECTED_COLUMNS[name] if c not in columns]
    if missing:
        raise SourceError(
            f"{where}: {name} data lacks column(s) {missing}; expected {list(EXPECTED_COLUMNS[name])}, found {columns}"
        )


def validate_columns(name: str, data: Dataset | DatasetDict, where: str = "dataset") -> None:
    """Check that every split of ``data`` has the hub columns of ``name``; the error names the missing ones."""
    import datasets

    _check_name(name)
    if isinstance(data, datasets.DatasetDict):
        for split, ds in data.items():
            _require(name, ds.column_names, f"{where} [{split}]")
    elif isinstance(data, datasets.Dataset):
        _require(name, data.column_names, where)
    else:
        raise ValueError(f"{where}: expected a datasets.Dataset or DatasetDict, found {type(data).__name__}")


# --------------------------------------------------------------------------------------------- cheap checks
def check_local_source(name: str, source: str | Path | Mapping[str, Any]) -> None:
    """Check a local source without loading it: every needed split has an existing data file (or the
    ``save_to_disk`` folder has the splits) whose header / first record carries the hub columns of ``name``.
    Hub ids and ``synthetic`` pass (nothing is fetched). Raises :class:`SourceError`."""
    _check_name(name)
    form = source_form(source)
    if form == "directory":
        _check_saved(name, Path(source).expanduser())
    elif form in ("file", "mapping"):
        for split, path in split_files(name, source).items():
            found = file_columns(name, path, split)
            _require_columns(name, split, path, found, mapped_columns(name, found))


def _require_columns(name: str, split: str, path: Path, found: list[str], produced: list[str]) -> None:
    missing = [c for c in EXPECTED_COLUMNS[name] if c not in produced]
    if missing:
        raise SourceError(f"{name} split {split!r}: {path} lacks column(s) {missing}; found {found}; {name} needs "
                          f"{list(EXPECTED_COLUMNS[name])}")


def file_columns(name: str, path: Path, split: str = "") -> list[str]:
    """The columns of a data file as :func:`load_dataset_source` reads them (a headerless SST-2 / AG News TSV gets
    its two columns), from its header or first record only."""
    fmt = file_format(path)
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(_parquet_file(path)).names)
    with _open_text(path) as fh:
        if fmt in (".csv", ".tsv"):
            first = next((r for r in _csv_reader(fh, fmt) if r), None)
            record = None if first is None else _first_row_record(name, first, f"{name} split {split!r}: {path}")
        elif fmt == ".jsonl":
            line = next((x for x in fh if x.strip()), None)
            record = None if line is None else _json_value(line, path)
        else:
            record = _first_json_record(fh, path)
    if record is None:
        raise SourceError(f"{name} split {split!r}: {path} holds no records")
    if not isinstance(record, Mapping):
        raise SourceError(f"{name} split {split!r}: {path}: records must be JSON objects, found {record!r:.60}")
    return list(record)


def _first_row_record(name: str, first: list[str], where: str) -> dict[str, Any]:
    """The first CSV/TSV row as a record of its columns; a headerless SST-2 / AG News row must be
    ``(text, label)`` with an allowed label (so a header of other names is not taken for data)."""
    columns, has_header = _columns_of_first_row(name, first)
    if has_header:
        return dict.fromkeys(columns)
    what = f"{where}: the first row {first!r:.80} is no header of {name} columns"
    if len(first) != len(columns):
        raise SourceError(f"{what}, nor a headerless row of {len(columns)} fields {columns}")
    try:
        _label_id(name, first[-1], what)
    except ValueError as err:
        raise SourceError(f"{err} (read as a headerless row {columns})") from None
    return dict(zip(columns, first))


def _json_value(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}: the first record is not valid JSON ({err})") from None


def _first_json_record(fh: IO[str], path: Path, chunk_size: int = 1 << 16) -> Any:
    """The first element of the JSON list in ``fh``, reading only as much of the file as it takes (None if the
    list is empty)."""
    decoder, text, eof = json.JSONDecoder(), "", False
    while not eof:
        chunk = fh.read(chunk_size)
        eof, text = not chunk, text + chunk
        head = text.lstrip()
        if not head:
            continue
        if head[0] != "[":
            raise SourceError(f"{path}: a .json source must hold a list of records, found {head[:20]!r}...")
        body = head[1:].lstrip()
        if body.startswith("]"):
            return None
        try:
            return decoder.raw_decode(body)[0]
        except json.JSONDecodeError as err:
            if eof:
                raise SourceError(f"{path}: the first record is not valid JSON ({err})") from None
    raise SourceError(f"{path}: the file is empty; a .json source must hold a list of records")


def _check_saved(name: str, path: Path) -> None:
    """A ``save_to_disk`` folder, from its JSON metadata: the needed splits and their features' columns."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        _require_splits(name, list(splits), path)
        parts = {split: path / split for split in SPLITS[name]}
    elif (path / "state.json").is_file():
        parts = {_single_split(name, path, "holds one Dataset"): path}
    else:
        raise SourceError(f"{name}: {path} is a folder but not one written by save_to_disk (it has neither "
                          "dataset_dict.json nor state.json); a folder source must be a saved Dataset(Dict)")
    for split, folder in parts.items():
        info = folder / "dataset_info.json"
        features = json.loads(info.read_text()).get("features") if info.is_file() else None
        if features is not None:
            _require_columns(name, split, folder, list(features), list(features))
