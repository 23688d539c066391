"""The safety reference (notebook 03; spec/nlsr.md §3, DESIGN.md §6 "EXPO"): the EXPO adapter of a method at each
α, and the reference itself, the candidate with the lowest validation harmful score, stored with the chosen α."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import Params
from ..expo import choose_alpha, expo_adapter, expo_factors
from ..runs import Artifact, Run, atomic_write_json
from .align import aligned_adapter_ref
from .evaluate import generations_stage, judge_stage
from .graph import ModelRef, request, stage_kind

REFERENCE_FILE = "reference.json"


def expo_alphas(params: Params) -> list[float]:
    """The candidate α values: the identity (:func:`identity_alpha`) and ``expo.alphas``."""
    return sorted({identity_alpha(params), *params.expo.alphas})


def identity_alpha(params: Params) -> float:
    """The α at which EXPO returns the aligned adapter unchanged: 0 in ``paper`` mode, 0.5 in ``factor_scaling``
    (both factors × 2α)."""
    return 0.0 if params.expo.mode == "paper" else 0.5


@stage_kind("expo", reads=("expo.mode",), consumes=("align",), args=("method", "alpha"))
def expo_stage(params: Params, run: Run, method: str, alpha: float) -> ModelRef:
    """The EXPO reference of ``method`` at ``alpha`` as a model under test (adapter files only).

    The un-extrapolated model is alpha = 0 in ``paper`` mode (alpha = 0.5 in ``factor_scaling`` mode)."""
    aligned = aligned_adapter_ref(params, run, method)
    tag = f"expo/{params.expo.mode}/{method}/alpha{alpha:g}"

    def build(out: Path) -> dict:
        expo_adapter(aligned.adapter, out / "adapter", alpha, params.expo.mode)
        scale_a, scale_b = expo_factors(alpha, params.expo.mode)
        return {"scale_A": scale_a, "scale_B": scale_b}

    artifact = request(params, run, "expo", tag, build, args={"method": method, "alpha": alpha},
                       inputs={"aligned": aligned.artifact})
    return ModelRef(tag, aligned.base, str(artifact.path / "adapter"), artifact)


@stage_kind("reference", reads=("judges.primary",), consumes=("expo", "judge"), args=("method",))
def reference_stage(params: Params, run: Run, method: str) -> ModelRef:
    """The safety reference of ``method``: its EXPO adapter at the α with the lowest validation harmful score of the
    primary judge (ties: the smallest α), copied with ``reference.json`` (the chosen α and every candidate's
    score)."""
    candidates = {alpha: expo_stage(params, run, method, alpha) for alpha in expo_alphas(params)}
    judged = {alpha: judge_stage(params, run, generations_stage(params, run, ref, "val"), params.judges.primary)
              for alpha, ref in candidates.items()}

    def build(out: Path) -> dict:
        scores = {alpha: a.manifest()["summary"]["harmful_score"] for alpha, a in judged.items()}
        alpha = choose_alpha(scores)
        shutil.copytree(candidates[alpha].adapter, out / "adapter")
        record = {"method": method, "alpha": alpha, "mode": params.expo.mode,
                  "val_harmful_scores": {f"{a:g}": s for a, s in scores.items()}}
        atomic_write_json(out / REFERENCE_FILE, record)
        return {"alpha": alpha}

    inputs = {f"expo_{a:g}": r.artifact for a, r in candidates.items()}
    inputs |= {f"val_{a:g}": j for a, j in judged.items()}
    artifact = request(params, run, "reference", f"reference/{method}", build, args={"method": method},
                       inputs=inputs)
    return ModelRef(f"reference/{method}", candidates[expo_alphas(params)[0]].base, str(artifact.path / "adapter"),
                    artifact)


def chosen_alpha(ref: ModelRef) -> float:
    """The α a reference stage chose."""
    return json.loads((ref.artifact.path / REFERENCE_FILE).read_text())["alpha"]
