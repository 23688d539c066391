"""The plan: every stage the selected notebooks need, as a graph with what it costs (``nlsr plan``).

:func:`collect` runs the notebooks' record builders (:mod:`.notebooks`) under a planning
:class:`~nlsr_lib.runs.Run`: nothing is built or read, each request becomes a :class:`~nlsr_lib.runs.Node`, in an
order where every node comes after its inputs. :func:`summary` adds up the counts per stage kind:

==================  =====================================================================================
trainings           LoRA trainings, pretraining, judge training, learned masks
training_tokens     an upper bound: rows × epochs × max_length (``max_steps`` × batch × max_length when set)
generations         greedy responses (safety prompts, task evaluation, calibration)
generated_tokens    an upper bound: responses × the decoding budget
judged_responses    responses a judge scores
model_loads         models loaded from disk (a base model with its adapter counts once)
==================  =====================================================================================

A count that params alone do not determine (the calibration prompts of a hub dataset) is ``None`` and left out of
the sums; :func:`summary` says how many nodes have one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..config import Params
from ..runs import Node, Run
from .notebooks import NOTEBOOK_STAGES

COUNTS = ("trainings", "training_tokens", "generations", "generated_tokens", "judged_responses", "model_loads")


@dataclass
class Plan:
    """The nodes the notebooks ``numbers`` need (dependency order) and the planning run that can build them."""

    params: Params
    numbers: tuple[str, ...]
    run: Run

    @property
    def nodes(self) -> list[Node]:
        return list(self.run.nodes.values())

    def pending(self) -> list[Node]:
        """The nodes not in the cache, in dependency order."""
        return [node for node in self.nodes if not node.cached]


def collect(params: Params, numbers: Iterable[str] | None = None, root=None) -> Plan:
    """The plan of the notebooks ``numbers`` (all by default) under ``params``."""
    numbers = tuple(numbers or NOTEBOOK_STAGES)
    run = Run(params.profile, root=root, planning=True, quiet=True)
    for number in numbers:
        NOTEBOOK_STAGES[number](params, run)
    return Plan(params, numbers, run)


def node_record(node: Node) -> dict[str, Any]:
    return {"stage": node.stage, "kind": node.kind, "fingerprint": node.fingerprint, "device": node.device,
            "cached": node.cached, "inputs": node.upstream, "counts": {k: node.counts.get(k, 0) for k in COUNTS}}


def summary(plan: Plan) -> dict[str, Any]:
    """Per stage kind (in first-request order) and in total: stages, cached, and the sum of every count."""
    kinds: dict[str, dict[str, Any]] = {}
    unknown = 0
    for node in plan.nodes:
        row = kinds.setdefault(node.kind, {"stages": 0, "cached": 0, **{k: 0 for k in COUNTS}})
        row["stages"] += 1
        row["cached"] += int(node.cached)
        for key in COUNTS:
            value = node.counts.get(key, 0)
            if value is None:
                unknown += 1
                continue
            row[key] += value
    total = {"stages": sum(r["stages"] for r in kinds.values()), "cached": sum(r["cached"] for r in kinds.values()),
             **{k: sum(r[k] for r in kinds.values()) for k in COUNTS}}
    return {"profile": plan.params.profile, "notebooks": list(plan.numbers), "by_kind": kinds, "total": total,
            "unknown_counts": unknown}


def to_json(plan: Plan) -> dict[str, Any]:
    """``nlsr plan --json``: the summary and every node (stage, kind, fingerprint, device, cached, inputs, counts)."""
    return {**summary(plan), "stages": [node_record(n) for n in plan.nodes]}


def table(plan: Plan) -> str:
    """``nlsr plan``: one line per stage kind and a total line."""
    s = summary(plan)
    header = ["kind", "stages", "cached", *COUNTS]
    rows = [[kind, *(f"{r[k]:,}" for k in header[1:])] for kind, r in s["by_kind"].items()]
    rows.append(["total", *(f"{s['total'][k]:,}" for k in header[1:])])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines.append(f"profile {s['profile']}, notebooks {', '.join(s['notebooks'])}"
                 + (f"; {s['unknown_counts']} count(s) known only after loading a hub dataset, not summed"
                    if s["unknown_counts"] else ""))
    return "\n".join(lines)
