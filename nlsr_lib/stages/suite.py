"""The safety evaluation suite as stages (issue 16; spec/evaluation.md, spec/somf.md §4): per model, each benchmark's
greedy responses (:func:`benchmark_generations_stage`, optionally through a red-team wrapper), every judge's verdicts
on them (:func:`~nlsr_lib.stages.evaluate.judge_stage`, the same stage as the primary set's), over-refusal on XSTest
(:func:`over_refusal_stage`) and general capability through lm-evaluation-harness (:func:`capability_stage`).

:func:`suite_rows` is one call for a table: a row per benchmark × wrapper × judge with the model's over-refusal and
capability, and :func:`judge_agreement` Cohen's κ between every pair of judges on the same responses.

Prompts come from the local copies of ``evaluation.data_dir`` (spec/evaluation.md §1.2), else from the tiny world's
counterparts (:mod:`nlsr_lib.tiny.benchmarks`, same schema and categories) when the profile's BeaverTails is the
synthetic world, else from the hub. The judges compare a response with the prompt as written (the HarmBench
behaviour, the StrongREJECT forbidden prompt), never with its wrapped form (spec §3).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from ..config import Params
from ..runs import Artifact, Run, atomic_write_json
from .evaluate import as_ref, generate_for, judge_stage
from .graph import ModelRef, request, stage_kind
from .world import uses_world, world_stage

# --------------------------------------------------------------------------------------------- prompts
def benchmark_source(params: Params) -> str:
    """Where the suite's prompts come from: ``local`` (``evaluation.data_dir``), ``world`` or ``hub``."""
    if params.evaluation.data_dir:
        return "local"
    return "world" if uses_world(params, "beavertails") else "hub"


def benchmark_prompts(params: Params, name: str, wrapper: str = "identity") -> list:
    """The judgeable records of benchmark ``name`` (HarmBench's copyright rows need MinHash files that are not here,
    spec §1.2 (c)), the first ``evaluation.limit`` of them, each through ``wrapper`` (spec §3). Read once per
    process for each setting: every model of a table answers the same prompts."""
    e = params.evaluation
    return list(_prompts(benchmark_source(params), e.data_dir, params.world.seed, e.tiny_size, e.limit, name,
                         wrapper)[0])


@functools.lru_cache(maxsize=128)
def _prompts(source: str, data_dir: str, world_seed: int, tiny_size: int, limit: int, name: str,
             wrapper: str) -> tuple[tuple, str]:
    """(records, their content hash) of :func:`benchmark_prompts`, keyed by everything they depend on."""
    from ..evaluate.benchmarks import load_benchmark
    from ..evaluate.wrappers import wrap
    from ..tiny.benchmarks import tiny_benchmark

    records = tiny_benchmark(name, world_seed, tiny_size) if source == "world" else load_benchmark(name, data_dir)
    records = [r for r in records if r.meta.get("judgeable", True)]
    if limit:
        records = records[:limit]
    if not records:
        raise ValueError(f"benchmark {name!r} has no judgeable prompt ({source}); check evaluation.data_dir / limit")
    records = tuple(wrap(r, wrapper) for r in records)
    key = hashlib.sha256(json.dumps([r.to_dict() for r in records], sort_keys=True).encode()).hexdigest()
    return records, key


def _prompts_key(params: Params, name: str, wrapper: str) -> str:
    e = params.evaluation
    return _prompts(benchmark_source(params), e.data_dir, params.world.seed, e.tiny_size, e.limit, name, wrapper)[1]


def _stage_suffix(benchmark: str, wrapper: str) -> str:
    return benchmark if wrapper == "identity" else f"{benchmark}@{wrapper}"


# --------------------------------------------------------------------------------------------- stages
@stage_kind("benchmark_generations", reads=("generation.max_new_tokens", "model"),
            consumes=("align", "attack", "expo", "restore", "fusion", "world"), device="gpu",
            args=("model", "benchmark", "wrapper"))
def benchmark_generations_stage(params: Params, run: Run, model: ModelRef | str, benchmark: str,
                                wrapper: str = "identity") -> Artifact:
    """Greedy responses of a model to one benchmark's prompts (through ``wrapper``) as ``generations.json``: per
    item its id, category, meta, the prompt the judges see (``prompt``: the unwrapped prompt or behaviour) and the
    text the model was sent (``sent``)."""
    from ..data.templates import alpaca_prompt

    ref = as_ref(params, run, model)
    records = benchmark_prompts(params, benchmark, wrapper)
    inputs = {"model": ref.artifact}
    if benchmark_source(params) == "world":
        inputs["world"] = world_stage(params, run)

    def build(out: Path) -> dict:
        sent = [alpaca_prompt(r.prompt) for r in records]
        responses = generate_for(params, run, ref, sent, params.generation.max_new_tokens,
                                 desc=f"generate {ref.tag}/{_stage_suffix(benchmark, wrapper)}")
        atomic_write_json(out / "generations.json", [
            {"id": r.id, "benchmark": r.benchmark, "category": r.category, "meta": dict(r.meta),
             "prompt": r.behavior, "sent": r.prompt, "response": response} for r, response in zip(records, responses)])
        return {"n": len(records)}

    n = len(records)
    counts = {"generations": n, "generated_tokens": n * params.generation.max_new_tokens, "model_loads": 1}
    return request(params, run, "benchmark_generations", f"generations/{ref.tag}/{_stage_suffix(benchmark, wrapper)}",
                   build, args={"benchmark": benchmark, "wrapper": wrapper},
                   values={"source": benchmark_source(params), "prompts": _prompts_key(params, benchmark, wrapper)},
                   inputs=inputs, counts=counts)


@stage_kind("over_refusal", consumes=("benchmark_generations",), args=("model",))
def over_refusal_stage(params: Params, run: Run, model: ModelRef | str) -> Artifact:
    """XSTest's over-refusal (spec/evaluation.md §2.5) of a model: its responses to the over-refusal set classified by
    XSTest's string match, ``over_refusal`` = full + partial refusals on the safe prompts (%), with the compliance
    on the unsafe contrasts."""
    from ..evaluate.overrefusal import classify_string_match, summarise

    ref = as_ref(params, run, model)
    generations = benchmark_generations_stage(params, run, ref, params.evaluation.over_refusal)

    def build(out: Path) -> dict:
        rows = json.loads((generations.path / "generations.json").read_text())
        labels = classify_string_match([r["response"] for r in rows])
        summary = summarise(labels, [r["meta"]["label"] for r in rows], [r["category"] for r in rows])
        atomic_write_json(out / "labels.json", [{**r, "label": label} for r, label in zip(rows, labels)])
        return {"over_refusal": summary.over_refusal, "full_refusal": summary.full_refusal,
                "partial_refusal": summary.partial_refusal, "compliance_unsafe": summary.compliance_unsafe,
                "n_safe": summary.n_safe, "n_unsafe": summary.n_unsafe,
                "by_type": summary.over_refusal_by_type()}

    return request(params, run, "over_refusal", f"over_refusal/{ref.tag}", build,
                   inputs={"generations": generations})


def capability_rows(params: Params, task: str) -> list[dict]:
    """A capability task's rows in COPA's schema: ``tiny_facts`` (the world's multiple choice) or
    ``<evaluation.capability_dir>/<task>.jsonl``."""
    from ..evaluate.capability import copa_rows_from_jsonl
    from ..tiny.capability import tiny_capability_rows

    e = params.evaluation
    if task == "tiny_facts":
        return tiny_capability_rows(params.world.seed, e.tiny_capability_size)
    if not e.capability_dir:
        raise ValueError(f"capability task {task!r} needs evaluation.capability_dir (a folder with {task}.jsonl in "
                         "COPA's schema); the tiny world's task is 'tiny_facts'")
    return copa_rows_from_jsonl(Path(e.capability_dir) / f"{task}.jsonl")


@stage_kind("capability", reads=("evaluation.capability_batch_size", "model.dtype"),
            consumes=("align", "attack", "restore", "fusion"), device="gpu", args=("model", "task"))
def capability_stage(params: Params, run: Run, model: ModelRef | str, task: str) -> Artifact:
    """General capability (spec/evaluation.md §4): lm-evaluation-harness's multiple-choice accuracy of a model (its
    adapter applied on the kept base) on a local COPA-format task, ``{acc, acc_stderr, n}``."""
    from ..evaluate.capability import evaluate_capability, write_task
    from ..evaluate.engine import engine

    ref = as_ref(params, run, model)
    rows = capability_rows(params, task)

    def build(out: Path) -> dict:
        task_dir = out / "task"
        write_task(task_dir, task, rows)
        with engine(params).model_for(ref.base, ref.adapter) as (lm, tokenizer):
            result = evaluate_capability(lm, tokenizer, [task], task_dir,
                                         batch_size=params.evaluation.capability_batch_size)
        return dict(result[task])

    key = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return request(params, run, "capability", f"capability/{task}/{ref.tag}", build, args={"task": task},
                   values={"rows": key}, inputs={"model": ref.artifact}, counts={"model_loads": 1})


# --------------------------------------------------------------------------------------------- table rows
def suite_rows(params: Params, run: Run, model: ModelRef | str) -> list[dict] | None:
    """A model's rows of the suite: one per benchmark × wrapper × judge of ``evaluation`` with ``benchmark``,
    ``wrapper``, ``judge``, ``harmful_score`` (100·flagged/parsed), ``empty``, ``n_prompts``, ``n_unjudged``, and the
    model-level ``over_refusal`` and ``capability_<task>`` (``None`` under a planning run)."""
    e = params.evaluation
    ref = as_ref(params, run, model)
    judged = {(b, w, j): judge_stage(params, run, benchmark_generations_stage(params, run, ref, b, w), j)
              for b in e.benchmarks for w in e.wrappers for j in e.judges}
    over = over_refusal_stage(params, run, ref) if e.over_refusal else None
    capability = {task: capability_stage(params, run, ref, task) for task in e.capability}
    if run.planning:
        return None
    extra: dict[str, Any] = {}
    if over is not None:
        summary = over.manifest()["summary"]
        extra.update(over_refusal=summary["over_refusal"], n_over_refusal=summary["n_safe"])
    for task, artifact in capability.items():
        summary = artifact.manifest()["summary"]
        extra.update({f"capability_{task}": 100.0 * summary["acc"], f"n_capability_{task}": summary["n"]})
    rows = []
    for (benchmark, wrapper, judge), artifact in judged.items():
        s = artifact.manifest()["summary"]
        usage = {f"api_{k}": v for k, v in s.get("usage", {}).items()}  # an API judge's calls, tokens, cost
        rows.append({"benchmark": benchmark, "wrapper": wrapper, "judge": judge, "harmful_score": s["harmful_score"],
                     "empty": s["empty"], "n_prompts": s["n"], "n_unjudged": s.get("n_unjudged", 0), **extra,
                     **usage})
    return rows


def judge_agreement(params: Params, run: Run, models: Sequence[ModelRef | str]) -> list[dict] | None:
    """Cohen's κ between every pair of ``evaluation.judges`` on the same responses (spec/evaluation.md §2.6), pooled
    over ``models`` and the suite's benchmarks: ``{judge_a, judge_b, kappa, agreement, n, ci_lo, ci_hi}``."""
    from ..evaluate.agreement import pairwise_kappas

    e = params.evaluation
    judged = [{j: judge_stage(params, run, benchmark_generations_stage(params, run, m, b, w), j) for j in e.judges}
              for m in models for b in e.benchmarks for w in e.wrappers]
    if run.planning:
        return None
    labels: dict[str, list] = {j: [] for j in e.judges}
    for by_judge in judged:
        for j, artifact in by_judge.items():
            verdicts = json.loads((artifact.path / "verdicts.json").read_text())
            labels[j] += [int(v["flagged"]) if v.get("parsed", True) else None for v in verdicts]
    return pairwise_kappas(labels, seed=e.bootstrap_seed)


__all__ = ["benchmark_generations_stage", "benchmark_prompts", "benchmark_source", "capability_stage",
           "judge_agreement", "over_refusal_stage", "suite_rows"]
