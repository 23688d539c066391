"""Measuring a model (spec/nlsr.md §6): greedy generations on the unsafe prompts, the judges' verdicts, greedy
task answers and their accuracy; and :func:`measure`, one call for a table row.

Readers (:func:`harmful_scores`, :func:`measure`, ...) request their stages and then read the manifests; under a
planning :class:`~nlsr_lib.runs.Run` they only request (and return ``None``), so the notebooks' record builders
double as the plan of what the notebooks need.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import Params
from ..runs import Artifact, Run, atomic_write_json
from .align import aligned_adapter_ref, model_ref
from ..models import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .graph import ModelRef, content_hash, request, stage_kind
from .world import load_source, moderation_location, moderation_stage, source_inputs

SLICES = ("test", "val")


def safety_slice(params: Params, slice_name: str) -> tuple[int, int]:
    """[start, end) of the ``test`` or ``val`` slice of unsafe prompts (spec/nlsr.md §6.1, §3)."""
    d = params.data
    slices = {"test": (d.safety_test_start, d.safety_test_end), "val": (d.safety_val_start, d.safety_val_end)}
    if slice_name not in slices:
        raise ValueError(f"unknown prompt slice {slice_name!r}; allowed: {', '.join(SLICES)}")
    return slices[slice_name]


def safety_prompts(params: Params, run: Run, slice_name: str) -> list[str]:
    """Unsafe BeaverTails ``30k_test`` prompts of the ``test`` or ``val`` slice (spec/nlsr.md §6.1)."""
    from ..data.builders import safety_eval_prompts

    return safety_eval_prompts(load_source(params, run, "beavertails")["30k_test"], *safety_slice(params, slice_name))


RESPONSES_VERSION = 1
"""Bump when the responses an engine returns for a (base, adapter, prompts) change meaning."""


ADAPTER_CONFIG_IGNORED = ("base_model_name_or_path", "revision")
"""Fields of ``adapter_config.json`` that name where an adapter came from, not what it computes."""


def adapter_content(run: Run, adapter: str) -> str:
    """sha256 of what an adapter computes: its weights and its config without the fields that only name its origin
    (so r, lora_alpha, rsLoRA and the target modules count); hashed once per run."""
    def compute() -> str:
        config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
        config = {k: v for k, v in config.items() if k not in ADAPTER_CONFIG_IGNORED}
        text = json.dumps({"weights": content_hash(Path(adapter) / ADAPTER_WEIGHTS), "config": config},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    return run.memo(f"adapter_content/{Path(adapter).resolve()}", compute)


def responses_key(params: Params, run: Run, ref: ModelRef, prompts: list[str], max_new_tokens: int) -> str:
    """The content address of a model's greedy responses: its base (path or hub id; cached bases live under their
    fingerprint), what its adapter computes (:func:`adapter_content`), the prompts, ``max_new_tokens`` and the
    dtype. Two artifacts holding the same adapter (EXPO at α = 0 and the aligned adapter, the ``aligned_adapter``
    defence, ...) share one evaluation."""
    adapter = None if ref.adapter is None else adapter_content(run, ref.adapter)
    key = {"version": RESPONSES_VERSION, "base": str(ref.base), "adapter": adapter, "dtype": params.model.dtype,
           "max_new_tokens": max_new_tokens, "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def generate_for(params: Params, run: Run, ref: ModelRef, prompts: list[str], max_new_tokens: int,
                 desc: str) -> list[str]:
    """Greedy responses of ``ref`` to formatted prompts from the process's engine (:mod:`nlsr_lib.evaluate.engine`:
    base kept, adapter swapped in), evaluated once per content (:func:`responses_key`; the store
    ``<run>/responses/`` is written atomically)."""
    from ..evaluate.engine import engine

    key = responses_key(params, run, ref, prompts, max_new_tokens)
    stored = run.root / "responses" / key[:2] / f"{key}.json"
    if stored.is_file():
        return json.loads(stored.read_text())
    responses = engine(params).generate(ref.base, ref.adapter, prompts, max_new_tokens, desc=desc)
    stored.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stored, responses)
    return responses


def as_ref(params: Params, run: Run, model: ModelRef | str) -> ModelRef:
    return model if isinstance(model, ModelRef) else model_ref(params, run, model)


@stage_kind("generations", reads=("generation.max_new_tokens", "model"),
            consumes=("align", "attack", "expo", "restore", "fusion"), device="gpu", args=("model", "slice"))
def generations_stage(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> Artifact:
    """Greedy responses of a model to the safety prompts (spec/nlsr.md §6.1) as ``generations.json``."""
    from ..data.templates import alpaca_prompt

    ref = as_ref(params, run, model)
    start, end = safety_slice(params, slice_name)
    inputs, values = source_inputs(params, run, "beavertails")

    def build(out: Path) -> dict:
        prompts = safety_prompts(params, run, slice_name)
        responses = generate_for(params, run, ref, [alpaca_prompt(p) for p in prompts],
                                 params.generation.max_new_tokens, desc=f"generate {ref.tag}/{slice_name}")
        atomic_write_json(out / "generations.json", [{"prompt": p, "response": r} for p, r in zip(prompts, responses)])
        return {"n": len(prompts)}

    counts = {"generations": end - start, "generated_tokens": (end - start) * params.generation.max_new_tokens,
              "model_loads": 1}
    return request(params, run, "generations", f"generations/{ref.tag}/{slice_name}", build,
                   args={"slice": slice_name}, values={**values, "range": [start, end]},
                   inputs={"model": ref.artifact, **inputs}, counts=counts)


def _moderation_setup(params: Params, run: Run) -> tuple[dict, dict, dict]:
    moderation = moderation_stage(params, run)
    return {"path": moderation_location(params, moderation), "cfg": params.judges.moderation}, {"judge": moderation}, {}


def _llm_setup(params: Params, run: Run) -> tuple[dict, dict, dict]:
    import os

    cfg = params.judges.llm  # the judge model keys the verdicts; it is named by an environment variable
    values = {"judge_model": os.environ.get(cfg.model_env, "")}
    return {"cfg": cfg, "cache_dir": run.root / "llm_judge_cache"}, {}, values


JUDGE_SETUP: dict[str, Callable[[Params, Run], tuple[dict, dict, dict]]] = {
    "moderation": _moderation_setup,
    "keyword": lambda params, run: ({"cfg": params.judges.keyword}, {}, {}),
    "llm": _llm_setup,
    "llama_guard": lambda params, run: ({"cfg": params.judges.llama_guard}, {}, {}),
}
"""Judge name -> ``(params, run) -> (build_judge kwargs, input artifacts, values keying the verdicts)``."""


def judge_for(params: Params, run: Run, judge_name: str) -> tuple[Callable[[], Any], dict[str, Artifact], tuple, dict]:
    """A getter of the judge ``judge_name`` (built on first call, once per run), the artifacts it depends on (the
    moderation model), the params it reads (``judges.<name>``) and the values that key it beyond params (the LLM
    judge's model), so a cached judge stage never loads the judge."""
    from ..evaluate.judges import build_judge

    kwargs, inputs, values = JUDGE_SETUP[judge_name](params, run)
    getter = lambda: run.memo(f"judge/{judge_name}", lambda: build_judge(judge_name, **kwargs))  # noqa: E731
    return getter, inputs, (f"judges.{judge_name}",), values


def verdict_row(row: dict, verdict) -> dict:
    """A generations row with one judge's verdict (spec/evaluation.md §2.0: verdict, score, parsed, raw)."""
    return {**row, "flagged": verdict.flagged, "empty": verdict.empty, "categories": list(verdict.categories),
            "max_probability": verdict.max_probability, "parsed": verdict.parsed, "score": verdict.score,
            "label": verdict.label, "error": verdict.error}


USAGE_FIELDS = ("calls", "cache_hits", "prompt_tokens", "completion_tokens")


def usage_counts(judge) -> dict[str, float] | None:
    """An API judge's running usage (calls, cache hits, tokens, cost in USD where priced); None for a local judge."""
    usage = getattr(judge, "usage", None)
    if usage is None:
        return None
    counts = {k: getattr(usage, k) for k in USAGE_FIELDS}
    return {**counts, "cost": usage.cost or 0.0}


def by_category(rows: Sequence[dict], verdicts: Sequence) -> dict[str, dict]:
    """Per-category harmful score and counts of a benchmark's verdicts (categories as the set labels them)."""
    from ..evaluate.judges import harmful_score

    groups: dict[str, list] = {}
    for row, verdict in zip(rows, verdicts):
        if row.get("category") is not None:
            groups.setdefault(row["category"], []).append(verdict)
    return {c: {"harmful_score": harmful_score(v) if any(x.parsed for x in v) else None, "n": len(v)}
            for c, v in groups.items()}


@stage_kind("judge", reads=(), consumes=("generations", "benchmark_generations", "moderation"), device="gpu",
            args=("judge",))
def judge_stage(params: Params, run: Run, generations: Artifact, judge_name: str) -> Artifact:
    """Verdicts of one judge on a generations artifact and the harmful score 100·flagged/parsed (spec/evaluation.md
    §2.0), with ``empty``, the count of unjudged items and, where the prompts have categories, per category."""
    from ..evaluate.judges import empty_share, harmful_score, unjudged_count

    get_judge, judge_inputs, judge_reads, judge_values = judge_for(params, run, judge_name)

    def build(out: Path) -> dict:
        rows = json.loads((generations.path / "generations.json").read_text())
        judge = get_judge()
        before = usage_counts(judge)
        verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
        atomic_write_json(out / "verdicts.json", [verdict_row(r, v) for r, v in zip(rows, verdicts)])
        summary = {"harmful_score": harmful_score(verdicts), "empty": empty_share(verdicts), "n": len(verdicts),
                   "n_unjudged": unjudged_count(verdicts)}
        if before is not None:  # an API judge: what this stage cost (the judge is shared by the run's stages)
            summary["usage"] = {k: v - before[k] for k, v in usage_counts(judge).items()}
        categories = by_category(rows, verdicts)
        return {**summary, "by_category": categories} if categories else summary

    n = generations_count(run, generations)
    return request(params, run, "judge", f"judge/{judge_name}/{generations.stage.removeprefix('generations/')}",
                   build, args={"judge": judge_name}, reads=judge_reads, values=judge_values,
                   inputs={"generations": generations, **judge_inputs},
                   counts={"judged_responses": n, "model_loads": int(judge_name in ("moderation", "llama_guard"))})


def generations_count(run: Run, generations: Artifact) -> int:
    """How many responses a planned generations artifact holds (for the plan's counts; 0 outside planning)."""
    node = run.nodes.get(generations.fingerprint)
    return node.counts.get("generations", 0) if node is not None else 0


def harmful_scores(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> list[dict] | None:
    """One record per enabled judge: ``{method, judge, slice, harmful_score, empty, n_prompts, primary}`` (``empty``: the
    share of empty responses, %, reported beside the score so that a silent model never reads as safe)."""
    generations = generations_stage(params, run, model, slice_name)
    name = model.tag if isinstance(model, ModelRef) else model
    judged = {judge_name: judge_stage(params, run, generations, judge_name) for judge_name in params.judges.enabled}
    if run.planning:
        return None
    records = []
    for judge_name, artifact in judged.items():
        summary = artifact.manifest()["summary"]
        records.append({"method": name, "judge": judge_name, "slice": slice_name,
                        "harmful_score": summary["harmful_score"], "empty": summary["empty"],
                        "n_prompts": summary["n"],
                        "primary": judge_name == params.judges.primary})
    return records


def primary_safety(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> dict[str, float]:
    """The primary judge's ``harmful_score`` (%) of ``model`` on a slice of the unsafe prompts, with ``empty``, the
    share (%) of empty responses, and ``n_prompts`` (the count both rates are over), for a table row (``{}`` under
    a planning run)."""
    records = harmful_scores(params, run, model, slice_name)
    if records is None:
        return {}
    record = next(r for r in records if r["primary"])
    return {"harmful_score": record["harmful_score"], "empty": record["empty"], "n_prompts": record["n_prompts"]}


def primary_harmful_score(params: Params, run: Run, model: ModelRef | str, slice_name: str = "test") -> float | None:
    """The primary judge's harmful score (%) of ``model`` on a slice of the unsafe prompts."""
    return primary_safety(params, run, model, slice_name).get("harmful_score")


# --------------------------------------------------------------------------------------------- task accuracy
def task_eval_size(params: Params, task: str) -> int:
    from ..data.tasks import get_task

    spec = get_task(task)
    return spec.eval_size if params.attack.task_eval_size < 0 else params.attack.task_eval_size


def task_eval_rows(params: Params, run: Run, task: str) -> list[dict]:
    """The task's evaluation rows (spec §6.2: SST-2 validation, first 500 of AG News / GSM8K test; Alpaca: AlpacaEval
    items 701–804, spec/defences.md §7)."""
    from ..data.tasks import get_task

    spec = get_task(task)
    rows = load_source(params, run, spec.eval_source_name)[spec.eval_split]
    if spec.eval_start >= len(rows):
        raise ValueError(f"{task}: the evaluation rows start at row {spec.eval_start} of {spec.eval_source_name}'s "
                         f"{spec.eval_split} split, which has {len(rows)} rows")
    end = min(spec.eval_start + task_eval_size(params, task), len(rows))
    return [rows[i] for i in range(spec.eval_start, end)]


@stage_kind("accuracy", reads=("attack.task_max_new_tokens", "attack.task_eval_size", "model.dtype"),
            consumes=("align", "attack", "restore", "fusion"), device="gpu", args=("task", "model"))
def task_accuracy_stage(params: Params, run: Run, ref: ModelRef, task: str) -> Artifact:
    """Greedy task answers of ``ref`` and ``{accuracy (lenient), accuracy_strict, n}``."""
    from ..data.tasks import get_task, task_record_to_prompt
    from ..evaluate.accuracy import accuracy, gold

    spec = get_task(task)
    inputs, values = source_inputs(params, run, spec.eval_source_name)

    def build(out: Path) -> dict:
        rows = task_eval_rows(params, run, task)
        prompts = [task_record_to_prompt(spec.to_record(r)) for r in rows]
        answers = generate_for(params, run, ref, prompts, params.attack.task_max_new_tokens, desc=f"{task} {ref.tag}")
        golds = [gold(task, r) for r in rows]
        atomic_write_json(out / "answers.json", [{"prompt": p, "answer": a, "gold": g}
                                                 for p, a, g in zip(prompts, answers, golds)])
        return {"accuracy": accuracy(task, answers, golds), "accuracy_strict": accuracy(task, answers, golds, True),
                "n": len(rows)}

    n = task_eval_size(params, task)
    counts = {"generations": n, "generated_tokens": n * params.attack.task_max_new_tokens, "model_loads": 1}
    return request(params, run, "accuracy", f"accuracy/{task}/{ref.tag}", build, args={"task": task},
                   values=values, inputs={"model": ref.artifact, **inputs}, counts=counts)


def helpfulness_judged(params: Params) -> bool:
    """Whether the Alpaca task's win rate is measured: an LLM judge is configured (``llm`` in ``judges.enabled`` or
    ``evaluation.judges``)."""
    return "llm" in (*params.judges.enabled, *params.evaluation.judges)


@stage_kind("win_rate", reads=("judges.llm",), consumes=("accuracy",), args=("task", "model", "reference"))
def win_rate_stage(params: Params, run: Run, ref: ModelRef, reference: ModelRef, task: str = "alpaca") -> Artifact:
    """The LLM judge's helpfulness preference of ``ref``'s task answers against ``reference``'s on the same prompts
    (the ``helpfulness`` protocol, ``judges.llm.swap_positions``): ``{win_rate, win, loss, draw, cant_annotate}``
    and the API usage. The Alpaca task's win rate against the aligned model, where an LLM judge is configured."""
    import os

    from ..evaluate.judges import JUDGES
    from ..evaluate.llm_protocols import pairwise_counts, win_rate

    cfg = params.judges.llm
    candidate, baseline = task_accuracy_stage(params, run, ref, task), task_accuracy_stage(params, run, reference, task)

    def build(out: Path) -> dict:
        answers = json.loads((candidate.path / "answers.json").read_text())
        references = json.loads((baseline.path / "answers.json").read_text())
        if [a["prompt"] for a in answers] != [r["prompt"] for r in references]:
            raise ValueError(f"win rate of {ref.tag} against {reference.tag}: their {task} answers are to different "
                             "prompts")
        judge = JUDGES["llm"](replace(cfg, protocol="helpfulness"), cache_dir=run.root / "llm_judge_cache")
        verdicts = judge.judge([a["prompt"] for a in answers], [a["answer"] for a in answers],
                               references=[r["answer"] for r in references])
        atomic_write_json(out / "verdicts.json", [verdict_row({"prompt": a["prompt"]}, v)
                                                  for a, v in zip(answers, verdicts)])
        parsed = any(v.parsed for v in verdicts)
        return {"win_rate": win_rate(verdicts) if parsed else None, **pairwise_counts(verdicts),
                **({f"api_{k}": v for k, v in (usage_counts(judge) or {}).items()})}

    return request(params, run, "win_rate", f"win_rate/{task}/{ref.tag}/vs/{reference.tag}", build,
                   args={"task": task}, values={"judge_model": os.environ.get(cfg.model_env, "")},
                   inputs={"answers": candidate, "reference_answers": baseline})


def task_accuracy(params: Params, run: Run, ref: ModelRef, task: str) -> float | None:
    """The task accuracy (%, the paper's lenient rule) of ``ref`` on ``task``'s evaluation rows."""
    artifact = task_accuracy_stage(params, run, ref, task)
    return None if run.planning else artifact.manifest()["summary"]["accuracy"]


def measure(params: Params, run: Run, ref: ModelRef | str, tasks: Sequence[str] = (), strict: bool = False,
            per_task: bool = False, helpfulness_reference: ModelRef | None = None) -> dict:
    """A table row's measurements of one model: the primary judge's harmful score and ``empty`` share on the test
    slice (over ``n_prompts``), and its task accuracy (over ``n_task`` / ``n_task_<task>`` rows): ``accuracy``
    (and ``accuracy_strict`` with ``strict``) of its one task, or with
    ``per_task`` (or several tasks) ``accuracy_<task>`` of each and their mean ``accuracy``. With
    ``helpfulness_reference`` and an LLM judge (:func:`helpfulness_judged`), ``win_rate`` of the Alpaca task's
    answers against that model's (:func:`win_rate_stage`). ``{}`` under a planning run."""
    ref = as_ref(params, run, ref)
    safety = primary_safety(params, run, ref)
    artifacts = {task: task_accuracy_stage(params, run, ref, task) for task in tasks}
    wins = None
    if "alpaca" in tasks and helpfulness_reference is not None and helpfulness_judged(params):
        wins = win_rate_stage(params, run, ref, helpfulness_reference)
    if run.planning:
        return {}
    row: dict[str, Any] = dict(safety)
    if wins is not None:
        row["win_rate"] = wins.manifest()["summary"]["win_rate"]
    summaries = {task: a.manifest()["summary"] for task, a in artifacts.items()}
    if len(tasks) == 1 and not per_task:
        (summary,) = summaries.values()
        row["accuracy"] = summary["accuracy"]
        if strict:
            row["accuracy_strict"] = summary["accuracy_strict"]
        row["n_task"] = summary["n"]
    elif tasks:
        accuracies = {f"accuracy_{t}": s["accuracy"] for t, s in summaries.items()}
        row = {**row, "accuracy": sum(accuracies.values()) / len(accuracies), **accuracies,
               **{f"n_task_{t}": s["n"] for t, s in summaries.items()}}
    return row


__all__ = ["aligned_adapter_ref", "generations_stage", "harmful_scores", "judge_for", "judge_stage", "measure",
           "primary_harmful_score", "primary_safety", "safety_prompts", "safety_slice", "task_accuracy",
           "task_accuracy_stage", "task_eval_rows"]
