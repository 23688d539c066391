"""Safety regions (notebook 04; spec/nlsr.md §2.5, §4; DESIGN.md §4): calibration data and safety-region masks.

* :func:`calibration_stage`: the reference's greedy answers to the PKU-SafeRLHF ``test`` prompts, kept where the
  primary judge finds them safe (§2.5), as ``calibration.json`` (``instruction, input, output``) and the preference
  variant ``preference.json`` (``instruction, input, chosen, rejected``) over the kept prompts. Decision (§9.4): the
  preference pairs are the alignment data's "exactly one safe response" pairs (chosen = safe), not
  ``better_response_id`` (helpfulness), so preference-SNIP scores the safety preference the references learnt.
* :func:`mask_stage`: one scorer of the :mod:`nlsr_lib.regions` registry on the reference adapter →
  ``mask.safetensors`` (adapter key → bool, True = safety-critical) with metadata; ``low_rank`` also writes its
  subspace bases. It reads only its own scorer's options, so adding a scorer to ``regions.scorers`` builds one mask.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Params
from ..runs import Artifact, Run, atomic_write_json
from .align import aligned_adapter_ref
from .evaluate import generate_for, judge_for
from .expo import reference_stage
from .graph import ModelRef, request, stage_kind
from .world import load_source, source_inputs

MASK_FILE = "mask.safetensors"
SUBSPACE_FILE = "subspaces.safetensors"
REFERENCES = ("expo", "plain")
SCORER_FIELDS = {"rank_keep_ratio": "rank_keep_ratio", "svd": "svd", "niter": "svd_niter", "positions": "positions",
                 "propagate": "propagate", "cumulative_grad": "snip.cumulative_grad", "beta": "snip.preference_beta"}


def reference_for(params: Params, run: Run, method: str, reference: str = "expo") -> ModelRef:
    """The safety reference of ``method``: ``expo`` (α chosen on the validation slice) or ``plain`` (aligned)."""
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; allowed: {', '.join(REFERENCES)}")
    return reference_stage(params, run, method) if reference == "expo" else aligned_adapter_ref(params, run, method)


def _saferlhf_test_rows(params: Params) -> int | None:
    """Rows of the SafeRLHF ``test`` split when params know them (the synthetic world), else None; at most
    ``regions.calibration.prompts`` when that is set."""
    rows = params.world.saferlhf_test if params.data.sources.pku_saferlhf == "synthetic" else None
    k = params.regions.calibration.prompts
    return rows if k < 0 else k if rows is None else min(rows, k)


@stage_kind("calibration", reads=("generation", "model", "judges.primary", "regions.calibration.filter",
                                  "regions.calibration.prompts"),
            consumes=("reference", "moderation"), device="gpu", args=("reference",))
def calibration_stage(params: Params, run: Run, ref: ModelRef) -> Artifact:
    """The reference's safe answers to the SafeRLHF ``test`` prompts (the first ``regions.calibration.prompts``
    distinct ones when set), and preference pairs over those prompts."""
    from ..data.builders import build_preference_pairs
    from ..data.templates import alpaca_prompt

    inputs, values = source_inputs(params, run, "pku_saferlhf")

    def build(out: Path) -> dict:
        test = load_source(params, run, "pku_saferlhf")["test"]
        prompts = list(dict.fromkeys(test["prompt"]))  # dataset order, each prompt once
        if params.regions.calibration.prompts > 0:
            prompts = prompts[:params.regions.calibration.prompts]
        answers = generate_for(params, run, ref, [alpaca_prompt(p) for p in prompts], params.generation.max_new_tokens,
                               desc=f"calibration {ref.tag}")
        gen_dir = out / "generations"
        gen_dir.mkdir()
        atomic_write_json(gen_dir / "generations.json",
                          [{"prompt": p, "response": r} for p, r in zip(prompts, answers)])
        verdicts = _judge(params, run, gen_dir)
        keep_all = params.regions.calibration.filter == "none"
        kept = [{"instruction": v["prompt"], "input": "", "output": v["response"]}
                for v in verdicts if keep_all or not v["flagged"]]
        if not kept:
            raise ValueError(f"calibration: the {params.judges.primary} judge flags every answer of {ref.tag}; "
                             "set regions.calibration.filter: none to keep unfiltered answers")
        kept_prompts = {r["instruction"] for r in kept}
        pairs = [r for r in build_preference_pairs(test, n=len(test), strict=False) if r["instruction"] in kept_prompts]
        atomic_write_json(out / "calibration.json", kept)
        atomic_write_json(out / "preference.json", pairs)
        return {"prompts": len(prompts), "kept": len(kept), "flagged": sum(v["flagged"] for v in verdicts),
                "preference_pairs": len(pairs)}

    filtered = params.regions.calibration.filter == "judge"
    judge_inputs = judge_for(params, run, params.judges.primary)[1] if filtered else {}
    rows = _saferlhf_test_rows(params)
    tokens = None if rows is None else rows * params.generation.max_new_tokens
    counts = {"generations": rows, "generated_tokens": tokens,
              "judged_responses": rows, "model_loads": 1 + int(filtered and params.judges.primary == "moderation")}
    return request(params, run, "calibration", f"calibration/{ref.tag}", build, values=values,
                   inputs={"model": ref.artifact, **judge_inputs, **inputs}, counts=counts)


def _judge(params: Params, run: Run, gen_dir: Path) -> list[dict]:
    """Verdicts of the primary judge on ``gen_dir/generations.json``."""
    get_judge = judge_for(params, run, params.judges.primary)[0]
    judge = get_judge()
    rows = json.loads((gen_dir / "generations.json").read_text())
    verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    return [{**r, "flagged": v.flagged} for r, v in zip(rows, verdicts)]


def _batches(params: Params, tokenizer, calibration: Artifact, data: str) -> list | None:
    from ..regions import calibration_batches, preference_batches

    c = params.regions.calibration
    if data == "none":
        return None
    if data == "preference":
        rows = json.loads((calibration.path / "preference.json").read_text())
        return preference_batches(tokenizer, rows, n=c.n, seed=c.seed, max_length=c.max_length,
                                  batch_size=c.batch_size)
    rows = json.loads((calibration.path / "calibration.json").read_text())
    return calibration_batches(tokenizer, rows, n=c.n, seed=c.seed, max_length=c.max_length, batch_size=c.batch_size)


def _utility_batches(params: Params, run: Run, tokenizer) -> list:
    """Benign Alpaca instructions with their answers: the utility set of the set-difference scorers."""
    from ..regions import calibration_batches

    c = params.regions.calibration
    rows = load_source(params, run, "alpaca")["train"]
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
    return calibration_batches(tokenizer, rows, n=c.n, seed=c.seed, max_length=c.max_length, batch_size=c.batch_size)


def scorer_reads(scorer: str) -> list[str]:
    """The params fields the ``scorer`` mask reads beyond every mask's (its options; the set-difference shares and
    the utility data for set-difference scorers)."""
    from ..regions import get_scorer

    spec = get_scorer(scorer)
    reads = [f"regions.{SCORER_FIELDS[o]}" for o in spec.options if o in SCORER_FIELDS]
    if spec.selection == "set_difference":
        reads.append("regions.set_difference")
    return reads


@stage_kind("mask", reads=("regions.tie_rule", "regions.seed", "regions.calibration", "model"),
            consumes=("reference", "calibration"), device="gpu", args=("reference", "scorer", "mask_sparsity"))
def mask_stage(params: Params, run: Run, ref: ModelRef, scorer: str, mask_sparsity: float | None = None) -> Artifact:
    """The ``scorer`` mask of the reference adapter at ``mask_sparsity`` (default ``regions.mask_sparsity``)."""
    from ..models import load_tokenizer, load_with_adapter
    from ..regions import batches_hash, build_mask, get_scorer, mask_metadata, overall_density, save_mask
    from ..regions import scorer_options

    spec = get_scorer(scorer)
    sparsity = params.regions.mask_sparsity if mask_sparsity is None else mask_sparsity
    calibration = calibration_stage(params, run, ref)
    inputs, values = source_inputs(params, run, "alpaca") if spec.selection == "set_difference" else ({}, {})

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(ref.base, params.model)
        model = load_with_adapter(ref.base, ref.adapter, params.model)
        batches = _batches(params, tokenizer, calibration, spec.data)
        utility = _utility_batches(params, run, tokenizer) if spec.selection == "set_difference" else None
        r = params.regions
        options = {k: v for k, v in scorer_options(r, scorer).items() if k not in ("mask_sparsity", "tie_rule", "seed")}
        if scorer == "low_rank":  # one pass gives both the mask's scores and the subspaces fusion projects onto
            from ..regions import masks_from_scores
            from ..regions.lowrank import low_rank_subspaces, save_subspaces

            result = low_rank_subspaces(model, batches, seed=r.seed, **options)
            masks = masks_from_scores(scorer, {k: w.abs() for k, w in result.projected.items()}, sparsity,
                                      tie_rule=r.tie_rule, seed=r.seed)
            save_subspaces(out / SUBSPACE_FILE, result.bases, {"reference": ref.tag})
        else:
            masks = build_mask(scorer, model, batches, sparsity, tie_rule=r.tie_rule, utility_batches=utility,
                               q=r.set_difference.q, p=r.set_difference.p, seed=r.seed, **options)
        digest = batches_hash(batches) if batches is not None else "none"
        save_mask(out / MASK_FILE, masks, mask_metadata(scorer, ref.tag, sparsity, digest))
        return {"density": overall_density(masks), "calibration_hash": digest}

    return request(params, run, "mask", f"masks/{ref.tag}/{scorer}/s{sparsity:g}", build,
                   args={"scorer": scorer, "mask_sparsity": sparsity}, reads=scorer_reads(scorer), values=values,
                   inputs={"model": ref.artifact, "calibration": calibration, **inputs},
                   counts={"model_loads": 1})


def load_stage_mask(artifact: Artifact) -> dict:
    """The mask dict of a :func:`mask_stage` artifact."""
    from ..regions import load_mask

    return load_mask(artifact.path / MASK_FILE)[0]
