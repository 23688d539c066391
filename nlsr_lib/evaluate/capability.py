"""General capability through lm-evaluation-harness's Python API (spec/evaluation.md §4; somf.md §4.6).

* :func:`write_task`: a local-file lm-eval task: ``<name>.jsonl`` (the rows), ``<name>.yaml`` (``dataset_path:
  json``, ``dataset_kwargs.data_files`` absolute, ``output_type: multiple_choice``) and the kind's doc functions
  beside the YAML (``!function``), so no hub access is needed. Task kinds live in :data:`TASK_KINDS`.
* :func:`evaluate_capability`: ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<model instance>,
  tokenizer=<tokenizer>)``: the model already loaded (adapter applied or merged) is scored as it is, never reloaded.
  Returns ``{task: {"acc", "acc_stderr", "n"}}``.
* :func:`copa_rows_from_jsonl`: real COPA-format rows (e.g. a local copy of SuperGLUE COPA validation), checked.

COPA (spec §4): context ``premise.strip()[:-1] + " because" | " therefore"``; choices ``" " + choice`` with its
first letter lower-cased; acc = argmax of summed log-likelihoods. The harness prepends ``target_delimiter`` " " to
each choice, so the continuation has two leading spaces (verified: ``("My body cast a shadow over the grass
because", "  the sun was rising.")``).

lm_eval is an optional dependency (``pip install nlsr[capability]``), imported lazily, after
``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set (huggingface_hub reads them once, at import; spec §4 "Offline").
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry import Registry

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
INSTALL_HINT = "pip install nlsr[capability]"
SPLIT = "validation"
TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

_COPA_UTILS = '''"""COPA doc functions, as lm-evaluation-harness's tasks/super_glue/copa/utils.py
(spec/evaluation.md §4). Written by nlsr_lib.evaluate.capability.write_task."""

CONNECTORS = {"cause": "because", "effect": "therefore"}


def convert_choice(choice):
    return choice[0].lower() + choice[1:]


def doc_to_text(doc):
    return doc["premise"].strip()[:-1] + " " + CONNECTORS[doc["question"]]


def doc_to_target(doc):
    return " " + convert_choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def doc_to_choice(doc):
    return [" " + convert_choice(doc["choice1"]), " " + convert_choice(doc["choice2"])]
'''


@dataclass(frozen=True)
class TaskKind:
    """A family of multiple-choice tasks: its row schema, its row check, and the module of doc functions written
    beside the YAML (``utils_module``.py holding ``utils_source``), named by the YAML's ``doc_functions`` keys."""

    fields: tuple[str, ...]
    check_row: Callable[[Mapping[str, Any], int], None]
    utils_module: str
    utils_source: str
    doc_functions: tuple[str, ...] = ("doc_to_text", "doc_to_target", "doc_to_choice")


COPA_FIELDS = ("premise", "choice1", "choice2", "question", "label", "idx")


def check_copa_row(row: Mapping[str, Any], i: int) -> None:
    """A COPA row: non-empty premise and choices, ``question`` in {cause, effect}, ``label`` in {0, 1}."""
    missing = [f for f in COPA_FIELDS if f not in row]
    if missing:
        raise ValueError(f"COPA row {i} lacks {missing}; a row has {', '.join(COPA_FIELDS)}")
    if row["question"] not in ("cause", "effect"):
        raise ValueError(f"COPA row {i}: question is {row['question']!r}; allowed: 'cause', 'effect'")
    if isinstance(row["label"], bool) or row["label"] not in (0, 1):
        raise ValueError(f"COPA row {i}: label is {row['label']!r}; allowed: 0, 1")
    for f in ("premise", "choice1", "choice2"):
        if not isinstance(row[f], str) or not row[f].strip():
            raise ValueError(f"COPA row {i}: {f} must be a non-empty string, got {row[f]!r}")


COPA = TaskKind(fields=COPA_FIELDS, check_row=check_copa_row, utils_module="copa_utils", utils_source=_COPA_UTILS)

TASK_KINDS: Registry[TaskKind] = Registry("capability task kind")
TASK_KINDS.register("copa", COPA)


def _task_yaml(name: str, data_file: Path, kind: TaskKind) -> str:
    """The task's YAML (spec §4 "Local-file tasks"): local JSON, one ``validation`` split, 0-shot, acc."""
    functions = "".join(f"{fn}: !function {kind.utils_module}.{fn}\n" for fn in kind.doc_functions)
    return (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {SPLIT}: {json.dumps(str(data_file))}\n"
            "output_type: multiple_choice\n"
            f"{SPLIT}_split: {SPLIT}\n"
            f"{functions}"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n")


def write_task(task_dir: str | Path, name: str, rows: Sequence[Mapping[str, Any]], kind: str = "copa") -> Path:
    """Write local-file task ``name`` of ``kind`` into ``task_dir`` (rows checked, ``idx`` filled in when absent);
    returns the YAML's path. ``TaskManager(include_path=task_dir)`` finds it by ``name``."""
    spec = TASK_KINDS[kind]
    if not TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r} is not allowed; allowed: a letter, then letters, digits or '_'")
    if not rows:
        raise ValueError(f"task {name!r} has no rows; a task needs at least one")
    task_dir = Path(task_dir).expanduser().resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / f"{name}.jsonl"
    with data_file.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            row = {"idx": i, **row}
            spec.check_row(row, i)
            f.write(json.dumps({k: row[k] for k in spec.fields}, ensure_ascii=False) + "\n")
    (task_dir / f"{spec.utils_module}.py").write_text(spec.utils_source, encoding="utf-8")
    yaml_path = task_dir / f"{name}.yaml"
    yaml_path.write_text(_task_yaml(name, data_file, spec), encoding="utf-8")
    return yaml_path


def copa_rows_from_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a COPA-format JSONL file (SuperGLUE's fields; ``idx`` optional), each checked."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
        row.setdefault("idx", len(rows))
        check_copa_row(row, len(rows))
        rows.append({k: row[k] for k in COPA_FIELDS})
    if not rows:
        raise ValueError(f"{path} holds no COPA rows")
    return rows


def import_lm_eval():
    """``lm_eval``, with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set first unless already set (spec §4 "Offline";
    they only take effect if this is the process's first import of huggingface_hub/datasets, so set them in the
    environment for a whole run; local-file tasks need no hub either way); a clear error when it is absent."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"general capability needs lm-evaluation-harness: {INSTALL_HINT} ({e})") from None
    return lm_eval


def _task_dirs(tasks: Mapping[str, str | Path] | Sequence[str], task_dir: str | Path | None) -> dict[str, Path]:
    """``{task: directory holding its YAML}`` from a mapping, or from a list of names all in ``task_dir``."""
    if isinstance(tasks, Mapping):
        dirs = {name: Path(d) for name, d in tasks.items()}
    else:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a list of names or a {{name: task_dir}} mapping, not the string {tasks!r}")
        if task_dir is None:
            raise ValueError("tasks given as a list of names need task_dir, the directory holding their YAML files")
        dirs = {name: Path(task_dir) for name in tasks}
    if not dirs:
        raise ValueError("evaluate_capability needs at least one task")
    for name, d in dirs.items():
        if not (d / f"{name}.yaml").is_file():
            raise FileNotFoundError(f"capability task {name!r}: {d / f'{name}.yaml'} does not exist (write it with "
                                    "write_task)")
    return {name: d.expanduser().resolve() for name, d in dirs.items()}


def _metrics(results: Mapping[str, Any], n_samples: Mapping[str, Any], task: str) -> dict[str, Any]:
    """``{"acc", "acc_stderr", "n"}`` from simple_evaluate's ``results``/``n-samples`` (keys ``metric,filter``);
    ``acc_stderr`` is None when the harness gives "N/A" (``bootstrap_iters=0``)."""
    row = results[task]
    stderr = row.get("acc_stderr,none")
    return {"acc": float(row["acc,none"]),
            "acc_stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": int(n_samples[task]["effective"])}


@contextlib.contextmanager
def _quiet_harness():
    """The harness's bars and notes silenced unless progress bars are on (:mod:`nlsr_lib.progress`): its tqdm bars
    write to ``sys.stderr`` (redirected here) and its loggers note routine facts (raised to ERROR)."""
    from ..progress import bars_enabled

    if bars_enabled():
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def evaluate_capability(model, tokenizer, tasks: Mapping[str, str | Path] | Sequence[str],
                        task_dir: str | Path | None = None, batch_size: int = 8, limit: float | None = None,
                        bootstrap_iters: int = 100000, num_fewshot: int | None = None,
                        random_seed: int = 0) -> dict[str, dict[str, Any]]:
    """Accuracy of ``model`` (a loaded ``PreTrainedModel`` or ``PeftModel``, evaluated as it is) on local tasks
    (spec §4): ``simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size), tasks,
    task_manager=TaskManager(include_path=...))``. ``tasks`` is ``{name: task_dir}`` or names in ``task_dir``.

    HFLM puts the model in eval mode and may give a tokenizer without a pad token one (its ``configure_pad_token``).
    Returns ``{task: {"acc": float, "acc_stderr": float | None, "n": rows scored}}``."""
    dirs = _task_dirs(tasks, task_dir)
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with _quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=sorted({str(d) for d in dirs.values()}), include_defaults=False)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(dirs), task_manager=manager, limit=limit,
                                      bootstrap_iters=bootstrap_iters, num_fewshot=num_fewshot, log_samples=False,
                                      random_seed=random_seed, numpy_random_seed=random_seed,
                                      torch_random_seed=random_seed)
    if out is None:  # non-zero ranks of a distributed run
        return {}
    return {task: _metrics(out["results"], out["n-samples"], task) for task in dirs}


__all__ = ["COPA", "COPA_FIELDS", "TASK_KINDS", "TaskKind", "check_copa_row", "copa_rows_from_jsonl",
           "evaluate_capability", "import_lm_eval", "write_task"]
