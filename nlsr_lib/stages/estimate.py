"""GPU-hours of a plan (``nlsr plan --gpu-hours``): the plan's counts times throughput constants, per backend.

Every ``gpu`` stage of the plan costs, on one GPU of the kind the constants describe:

* a training: ``training_tokens × fill / train_tokens_per_s``. The plan's count is an upper bound (rows × epochs ×
  ``max_length``); ``fill`` is the real share of it (the mean tokenized example over ``max_length``);
* a generation stage: ``generated_tokens × decoded_share / generate_tokens_per_s``. With ``hf`` a batch runs until
  its longest row stops; finished rows leave it (the compacting decoder), but a GPU's decoding step costs about the
  same for fewer rows, so the share is 1; vLLM's continuous batching decodes what the responses hold (they stop at
  the response cut);
* a judge stage: ``judged_responses × judge_tokens_per_response / judge_tokens_per_s`` (a classifier's forward
  pass is one prefill); the keyword judge costs nothing;
* model loads: the engine keeps its bases, so a worker loads each base once (``bases_per_worker × load_s`` per
  GPU), not once per evaluation.

The wall time on N GPUs is ``max(total / N, critical path)``: the grid's stages are independent but for their
inputs, and the longest chain of inputs (SFT → DPO → attack → evaluation → ...) cannot be spread.
The constants and where each comes from are in :data:`THROUGHPUT`; the README quotes the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..names import FIELD_DEFENCES
from ..runs import Node
from .plan import Plan


@dataclass(frozen=True)
class Throughput:
    """What one GPU does per second for an 8B-shaped bf16 model, and where the number comes from."""

    generate_tokens_per_s: float
    decoded_share: float
    judge_tokens_per_s: float
    judge_tokens_per_response: int
    train_tokens_per_s: float
    fill: float
    load_s: float
    bases_per_worker: int
    source: str


_COMMON = dict(
    judge_tokens_per_s=10_000.0, judge_tokens_per_response=256, train_tokens_per_s=3_000.0, fill=0.25,
    load_s=60.0, bases_per_worker=2)
"""Shared by both backends: the judge reads ≤ 256 tokens per response (``judges.moderation.max_length``) in bf16
batches at 10k tokens/s (a 7B prefill on an H100 runs at 20-40k with HF; halved for padding); LoRA training of
an 8B model in bf16 with gradient checkpointing at 3k tokens/s (6·N FLOPs a token at ~15 % of an H100's bf16
peak, conservative for trl's overhead, DPO's reference pass and short sequences); ``fill`` 0.25: the paper's
examples, tokenized in the Alpaca template, average ~150-300 tokens of ``max_length`` 1024 (SST-2 ~90, AG News
~120, GSM8K ~250, BeaverTails ~200, SafeRLHF pairs ~2×250, measured at ~4 characters a token on
``../shared/data``); a 16 GB base read from local disk in 60 s."""

THROUGHPUT: dict[str, Throughput] = {
    "hf": Throughput(generate_tokens_per_s=2_418.0, decoded_share=1.0, **_COMMON,
                     source="measured on one H100, bf16 8B-shaped Llama, HF generate at batch 256 and 128 new "
                            "tokens: 2418 tokens/s (130 at batch 16, 766 at 64); the engine's token budget gives "
                            "batches of ~256 rows of 512 new tokens in a third of an 80 GB GPU's free memory"),
    "vllm": Throughput(generate_tokens_per_s=6_000.0, decoded_share=0.6, **_COMMON,
                       source="assumed, not measured here: vLLM serves an 8B bf16 model at 10-20k output tokens/s "
                              "on one H100 in offline batch mode; taken at 6k for multi-LoRA overhead and the "
                              "switch between the two bases; responses decoded to ~60 % of max_new_tokens"),
}


SUITE_KINDS = frozenset({"benchmark_generations", "over_refusal", "capability"})
"""The evaluation suite's stage kinds (:mod:`nlsr_lib.stages.suite`); with the judges of their responses they are
the estimate's ``suite_hours``; the stages of the field's defences (:func:`is_field_defence_stage`) and their
evaluations its ``defences_hours``; the rest its ``grid_hours`` (the NLSR study itself)."""


def stage_seconds(node: Node, t: Throughput) -> float:
    """GPU seconds of one stage under ``t`` (0 for a CPU stage: restoration, merges, masks run in seconds)."""
    if node.device != "gpu":
        return 0.0
    c = {k: (v or 0) for k, v in node.counts.items()}
    seconds = c.get("training_tokens", 0) * t.fill / t.train_tokens_per_s
    seconds += c.get("generated_tokens", 0) * t.decoded_share / t.generate_tokens_per_s
    if node.kind == "judge" and node.config.get("args", {}).get("judge") != "keyword":
        seconds += c.get("judged_responses", 0) * t.judge_tokens_per_response / t.judge_tokens_per_s
    return seconds


def critical_path_seconds(plan: Plan, t: Throughput) -> float:
    """The longest chain of inputs, in GPU seconds (nodes come after their inputs in the plan)."""
    finish: dict[str, float] = {}
    for node in plan.nodes:
        start = max((finish.get(fp, 0.0) for fp in node.upstream), default=0.0)
        finish[node.fingerprint] = start + stage_seconds(node, t)
    return max(finish.values(), default=0.0)


def gpu_hours(plan: Plan, backend: str = "hf", gpus: int = 1) -> dict[str, Any]:
    """GPU-hours per stage kind and in total, and the wall-clock hours on ``gpus`` GPUs, for ``backend``."""
    if backend not in THROUGHPUT:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(THROUGHPUT)}")
    if gpus < 1:
        raise ValueError(f"gpus must be ≥ 1, got {gpus}")
    t = THROUGHPUT[backend]
    by_kind: dict[str, float] = {}
    suite = defences = 0.0
    benchmark_generations = {n.fingerprint for n in plan.nodes if n.kind in SUITE_KINDS}
    for node in plan.nodes:
        if not node.cached:
            seconds = stage_seconds(node, t)
            by_kind[node.kind] = by_kind.get(node.kind, 0.0) + seconds
            if node.kind in SUITE_KINDS or benchmark_generations & set(node.upstream):
                suite += seconds
            elif is_field_defence_stage(node.stage):
                defences += seconds
    loads = gpus * t.bases_per_worker * t.load_s
    total = sum(by_kind.values()) + loads
    critical = critical_path_seconds(plan, t)
    return {"profile": plan.params.profile, "backend": backend, "gpus": gpus,
            "by_kind_hours": {k: round(v / 3600, 2) for k, v in by_kind.items() if v},
            "suite_hours": round(suite / 3600, 1), "defences_hours": round(defences / 3600, 1),
            "grid_hours": round((total - suite - defences) / 3600, 1),
            "model_loads_hours": round(loads / 3600, 2), "gpu_hours": round(total / 3600, 1),
            "critical_path_hours": round(critical / 3600, 1),
            "wall_hours": round(max(total / gpus, critical) / 3600, 1), "constants": asdict(t)}


def is_field_defence_stage(stage: str) -> bool:
    """Whether a stage serves one of the field's defences (spec/defences.md): its name carries the defence as a
    ``+name`` tag (``align/dpo+vaccine``, ``attack/dpo+lisa/…``), a ``_name`` mixture suffix (``…_safety_mixing``)
    or a ``/name/`` folder (``restore/antidote/…``), and so do the evaluations of the model it serves."""
    return any(mark in stage for name in FIELD_DEFENCES.names() for mark in (f"+{name}", f"_{name}", f"/{name}/"))


def report(estimate: dict[str, Any]) -> str:
    """A few lines for ``nlsr plan --gpu-hours``."""
    kinds = ", ".join(f"{k} {v:g} h" for k, v in estimate["by_kind_hours"].items())
    return (f"{estimate['profile']} on {estimate['gpus']} GPU(s), backend {estimate['backend']}: "
            f"{estimate['gpu_hours']:g} GPU-hours ({kinds}; model loads {estimate['model_loads_hours']:g} h; "
            f"the study {estimate['grid_hours']:g} h, the evaluation suite {estimate['suite_hours']:g} h, "
            f"the field's defences {estimate['defences_hours']:g} h); "
            f"critical path {estimate['critical_path_hours']:g} h; wall {estimate['wall_hours']:g} h\n"
            f"constants: {estimate['constants']['source']}")
