"""Stages of notebook 06: fusing the aligned adapter with attacked task adapters (spec/somf.md §2-3,
spec/merging.md; DESIGN.md §4-6).

Every fusion works in LoRA-factor space relative to the aligned adapter of ``fusion.method`` (the attack continued
training it, so ``τ_t = θ_t − θ_aligned`` key by key) on the adapters attacked at ``fusion.poison_ratio``, and
writes a PEFT adapter over W_sft. The fusions, in a registry (:data:`FUSIONS`):

* every merge operator of :data:`nlsr_lib.fusion.MERGE_METHODS`: ``θ_aligned + Merge({τ_t})``;
* ``region_neuron_{outside,inside}``: the ``fusion.region_operator`` update restricted to the complement of (or to)
  the NLSR safety region of notebook 04 (the low-rank mask of the EXPO reference), ``θ_aligned + (1 − m) ⊙ Δ``;
* ``region_rank_{out,onto}``: that update projected out of (onto) the low-rank scorer's safety subspaces,
  ``θ_aligned + (I − U Uᵀ) Δ``;
* ``region_heads_outside``: heads ranked by the density of the safety mask in their rows/columns, the top
  ``fusion.head_fraction`` keep their aligned values;
* ``learned_mask``: SOMF's mask learned with DPO on safety pairs (:mod:`nlsr_lib.fusion.learned_mask`), exported as
  ``fusion.learned_mask.export``;
* ``learned_mask_random``: its control, the exported mask's entries randomly permuted within each tensor (same
  keep count and rescaling, positions not learned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..config import Params
from ..progress import bars_enabled
from ..registry import Registry
from ..runs import Artifact, Run, atomic_write_json
from .align import aligned_adapter_ref
from .attack import attack_stage
from .graph import ModelRef, request, stage_kind
from .regions import SUBSPACE_FILE, load_stage_mask, mask_stage
from .world import load_source, source_inputs

MASK_LOGITS_FILE = "mask_logits.safetensors"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class FusionInputs:
    """What a fusion reads: the aligned adapter, the task adapters and (for regions) the safety region."""

    aligned: Mapping[str, torch.Tensor]
    tasks: Sequence[Mapping[str, torch.Tensor]]
    params: Params
    region: Artifact | None  # the mask stage of notebook 04 (mask + subspaces)
    head_dim: int


@dataclass(frozen=True)
class FusionKind:
    """A fusion: ``fn(FusionInputs) -> fused adapter state``, or (``trained``) its own stage
    ``fn(params, run, tasks) -> ModelRef``."""

    name: str
    fn: Callable
    uses_region: bool = False
    trained: bool = False


FUSIONS: Registry[FusionKind] = Registry("fusion", make=FusionKind)


def register_fusion(name: str, uses_region: bool = False, trained: bool = False):
    return FUSIONS.register(name, uses_region=uses_region, trained=trained)


def _operator_kwargs(params: Params, operator: str) -> dict:
    from ..fusion import get_merge, method_params

    f = params.fusion
    scope = f.ties_scope if get_merge(operator).trims else "tensor"
    return {"scope": scope, "single_task_identity": f.single_task_identity, **method_params(f, operator)}


def _register_operators() -> None:
    from ..fusion import MERGE_METHODS, merge_adapter_states

    for operator in MERGE_METHODS:
        def fuse(x: FusionInputs, operator=operator) -> dict[str, torch.Tensor]:
            return merge_adapter_states(x.aligned, x.tasks, operator, **_operator_kwargs(x.params, operator))

        fuse.__doc__ = f"``θ_aligned + {operator}({{τ_t}})``"
        register_fusion(operator)(fuse)


_register_operators()


def _region_kwargs(x: FusionInputs) -> dict:
    kwargs = _operator_kwargs(x.params, x.params.fusion.region_operator)
    kwargs.pop("single_task_identity")
    return kwargs


def _region_mask(x: FusionInputs) -> dict[str, torch.Tensor]:
    return load_stage_mask(x.region)


def _neuron(where: str):
    def fuse(x: FusionInputs) -> dict[str, torch.Tensor]:
        from ..fusion import fuse_neurons

        return fuse_neurons(x.aligned, x.tasks, _region_mask(x), x.params.fusion.region_operator, where=where,
                            **_region_kwargs(x))

    return fuse


def _rank(mode: str):
    def fuse(x: FusionInputs) -> dict[str, torch.Tensor]:
        from ..fusion import fuse_ranks
        from ..regions.lowrank import load_subspaces

        bases, _ = load_subspaces(x.region.path / SUBSPACE_FILE)
        return fuse_ranks(x.aligned, x.tasks, bases, x.params.fusion.region_operator, mode=mode,
                          **_region_kwargs(x))

    return fuse


register_fusion("region_neuron_outside", uses_region=True)(_neuron("outside"))
register_fusion("region_neuron_inside", uses_region=True)(_neuron("inside"))
register_fusion("region_rank_out", uses_region=True)(_rank("out"))
register_fusion("region_rank_onto", uses_region=True)(_rank("onto"))


@register_fusion("region_heads_outside", uses_region=True)
def _heads_outside(x: FusionInputs) -> dict[str, torch.Tensor]:
    """Heads scored by the share of safety-critical entries they own (the mask as a 0/1 importance)."""
    from ..fusion import fuse_heads

    scores = {k: m.float() for k, m in _region_mask(x).items()}
    return fuse_heads(x.aligned, x.tasks, scores, x.params.fusion.region_operator, head_dim=x.head_dim,
                      fraction=x.params.fusion.head_fraction, where="outside", **_region_kwargs(x))


def get_fusion(name: str) -> FusionKind:
    return FUSIONS[name]


def fusion_names(params: Params) -> list[str]:
    """The profile's fusions in notebook order: its operators, every region variant, the learned mask."""
    regions = [n for n, k in FUSIONS.items() if k.uses_region]
    trained = [n for n, k in FUSIONS.items() if k.trained]
    return [*params.fusion.operators, *regions, *trained]


# --------------------------------------------------------------------------------------------- stages
def task_refs(params: Params, run: Run, tasks: Sequence[str]) -> list[ModelRef]:
    """The adapters of ``fusion.method`` attacked on each task at ``fusion.poison_ratio`` (notebook 02)."""
    f = params.fusion
    return [attack_stage(params, run, f.method, task, f.poison_ratio) for task in tasks]


def fusion_inputs(params: Params, run: Run, tasks: Sequence[str]) -> tuple[ModelRef, list[ModelRef], dict]:
    """The aligned adapter, the attacked adapters of ``tasks`` and the stage inputs they make."""
    aligned = aligned_adapter_ref(params, run, params.fusion.method)
    attacked = task_refs(params, run, tasks)
    inputs = {"aligned": aligned.artifact, **{f"task{i}": r.artifact for i, r in enumerate(attacked)}}
    return aligned, attacked, inputs


def region_stage(params: Params, run: Run) -> Artifact:
    """The NLSR safety region of ``fusion.method``: the low-rank mask (and subspaces) of its EXPO reference."""
    from .expo import reference_stage

    return mask_stage(params, run, reference_stage(params, run, params.fusion.method), "low_rank")


def _inputs_tag(params: Params, tasks: Sequence[str]) -> str:
    return f"{params.fusion.method}/{'+'.join(tasks)}_p{params.fusion.poison_ratio:g}"


def _write_adapter(out: Path, state: Mapping[str, torch.Tensor], aligned_dir: Path, record: dict) -> Path:
    """The fused adapter (aligned adapter's config and dtype, tokenizer files copied) and its provenance."""
    from ..models import copy_tokenizer_files, read_adapter, write_adapter

    aligned, cfg = read_adapter(aligned_dir)
    adapter = out / "adapter"
    write_adapter(adapter, {k: v.to(aligned[k].dtype) for k, v in state.items()}, cfg)
    copy_tokenizer_files(aligned_dir, adapter)
    atomic_write_json(out / "fusion.json", record)
    return adapter


def fusion_values(params: Params, name: str) -> dict:
    """The settings fusion ``name`` reads: its operator's parameters, or for a region fusion the region operator's
    (and ``fusion.head_fraction`` for the head-level region)."""
    f = params.fusion
    if not get_fusion(name).uses_region:
        return {"operator_kwargs": _operator_kwargs(params, name)}
    values = {"region_operator": f.region_operator, "operator_kwargs": _operator_kwargs(params, f.region_operator)}
    if name == "region_heads_outside":
        values["head_fraction"] = f.head_fraction
    return values


@stage_kind("fusion", consumes=("align", "attack", "mask"), args=("tasks", "name"))
def fusion_stage(params: Params, run: Run, tasks: Sequence[str], name: str) -> ModelRef:
    """The aligned adapter fused with the attacked adapters of ``tasks`` by fusion ``name`` (module docstring)."""
    kind = get_fusion(name)
    if kind.trained:
        return kind.fn(params, run, tasks)
    from ..models import read_adapter

    aligned, attacked, inputs = fusion_inputs(params, run, tasks)
    region = region_stage(params, run) if kind.uses_region else None
    if region is not None:
        inputs["region"] = region

    def build(out: Path) -> dict:
        from ..fusion.regions import head_dim_from_config

        state_aligned, _ = read_adapter(aligned.adapter)
        tasks_state = [read_adapter(r.adapter)[0] for r in attacked]
        base_config = json.loads((Path(aligned.base) / "config.json").read_text())
        x = FusionInputs(state_aligned, tasks_state, params, region, head_dim_from_config(base_config))
        state = kind.fn(x)
        _write_adapter(out, state, Path(aligned.adapter), {"fusion": name, "tasks": list(tasks),
                                                            "inputs": [r.tag for r in attacked]})
        moved = sum(float((state[k].float() - v.float()).norm() ** 2) for k, v in state_aligned.items()) ** 0.5
        return {"distance_from_aligned": moved}

    tag = f"fusion/{_inputs_tag(params, tasks)}/{name}"
    artifact = request(params, run, "fusion", tag, build, args={"tasks": list(tasks), "name": name},
                       values=fusion_values(params, name), inputs=inputs)
    return ModelRef(tag, aligned.base, str(artifact.path / "adapter"), artifact)


def _masked_fusion(params: Params, aligned: ModelRef, attacked: Sequence[ModelRef]):
    """The :class:`~.fusion.learned_mask.Fusion` a learned mask acts on: the aligned adapter, the attacked adapters'
    factor-space task vectors (each adapter read once) and ``fusion.learned_mask``'s merge settings."""
    from ..fusion import method_params
    from ..fusion.learned_mask import Fusion
    from ..models import read_adapter

    lm = params.fusion.learned_mask
    state_aligned = {k: v.float() for k, v in read_adapter(aligned.adapter)[0].items()}
    taus = []
    for ref in attacked:
        state = read_adapter(ref.adapter)[0]
        taus.append({k: state[k].float() - v for k, v in state_aligned.items()})
    return Fusion(state_aligned, taus, merge=lm.merge, merge_params=method_params(params.fusion, lm.merge),
                  scope=params.fusion.ties_scope, rescale=lm.rescale, detach_mean=lm.detach_mean)


@stage_kind("learned_mask", reads=("fusion.learned_mask", "fusion.ties_scope", "model"), consumes=("align", "attack"),
            device="gpu", args=("tasks",))
def learned_mask_stage(params: Params, run: Run, tasks: Sequence[str]) -> ModelRef:
    """SOMF's learned mask over the task vectors of ``tasks`` (somf §2), trained with DPO on the SafeRLHF ``test``
    split's safety pairs (chosen = the safe response; SOMF's realign data), exported as a fused adapter."""
    from ..data.builders import build_preference_pairs
    from ..fusion import method_params
    from ..fusion.learned_mask import export_adapter_state, train_mask
    from ..models import load_tokenizer, load_with_adapter
    from ..regions import preference_batches
    from ..regions.masks import atomic_save_tensors

    lm = params.fusion.learned_mask
    aligned, attacked, inputs = fusion_inputs(params, run, tasks)
    source_deps, source_values = source_inputs(params, run, "pku_saferlhf")

    def build(out: Path) -> dict:
        fusion = _masked_fusion(params, aligned, attacked)
        test = load_source(params, run, "pku_saferlhf")["test"]
        pairs = build_preference_pairs(test, n=len(test), strict=False)
        if not pairs:
            raise ValueError("learned mask: the SafeRLHF test split has no pair with exactly one safe response")
        tokenizer = load_tokenizer(aligned.base, params.model)
        batches = preference_batches(tokenizer, pairs, n=lm.n_pairs, seed=lm.seed, max_length=lm.max_length,
                                     batch_size=lm.batch_size)
        model = load_with_adapter(aligned.base, aligned.adapter, params.model)
        lr = lm.learning_rate if len(fusion.taus) == 1 else lm.learning_rate_multi
        mask, history = train_mask(model, fusion, batches, temperature=lm.temperature, init_logit=lm.init_logit,
                                   beta=lm.beta, learning_rate=lr, epochs=lm.epochs, seed=lm.seed,
                                   micro_batch=lm.micro_batch, logprob_chunk=lm.logprob_chunk,
                                   gradient_checkpointing=lm.gradient_checkpointing, show_progress=bars_enabled())
        atomic_save_tensors(out / MASK_LOGITS_FILE, mask.state(),
                            {"temperature": str(lm.temperature), "tasks": ",".join(tasks)})
        atomic_write_json(out / HISTORY_FILE, history)
        state = export_adapter_state(fusion, mask, lm.export, lm.seed)
        _write_adapter(out, state, Path(aligned.adapter), {"fusion": "learned_mask", "tasks": list(tasks),
                                                            "inputs": [r.tag for r in attacked],
                                                            "export": lm.export})
        last = history[-1]
        return {"steps": len(history), "pairs": sum(len(b["chosen_input_ids"]) for b in batches),
                "first_loss": history[0]["loss"], "last_loss": last["loss"], "keep_rate": last["keep_rate"],
                "mean_probability": last["mean_probability"]}

    tag = f"fusion/{_inputs_tag(params, tasks)}/learned_mask"
    counts = {"trainings": 1, "training_tokens": int(2 * lm.n_pairs * lm.epochs * lm.max_length),
              "model_loads": 1}
    artifact = request(params, run, "learned_mask", tag, build, args={"tasks": list(tasks)},
                       values={**source_values, "merge_params": method_params(params.fusion, lm.merge)},
                       inputs={**inputs, **source_deps}, counts=counts)
    return ModelRef(tag, aligned.base, str(artifact.path / "adapter"), artifact)


def mask_history(ref: ModelRef) -> list[dict]:
    """The per-step training history (loss, reward margin, keep rate) of a :func:`learned_mask_stage` model."""
    return json.loads((Path(ref.adapter).parent / HISTORY_FILE).read_text())


@stage_kind("learned_mask_random", reads=("fusion.learned_mask", "fusion.ties_scope"),
            consumes=("learned_mask", "align", "attack"), args=("tasks",))
def learned_mask_random_stage(params: Params, run: Run, tasks: Sequence[str]) -> ModelRef:
    """The learned mask's control: the exported mask permuted within each tensor (seed ``learned_mask.seed``)."""
    from ..fusion.learned_mask import ConcreteMask, fused_adapter_state, permuted_mask
    from ..fusion import method_params
    from ..regions.masks import read_tensors

    lm = params.fusion.learned_mask
    learned = learned_mask_stage(params, run, tasks)
    aligned, attacked, inputs = fusion_inputs(params, run, tasks)

    def build(out: Path) -> dict:
        logits, _ = read_tensors(learned.artifact.path / MASK_LOGITS_FILE)
        mask = ConcreteMask({k: v.shape for k, v in logits.items()}, lm.temperature)
        mask.load_state(logits)
        fusion = _masked_fusion(params, aligned, attacked)
        control = permuted_mask(mask.export(lm.export, lm.seed), lm.seed)
        state = fused_adapter_state(fusion, control)
        _write_adapter(out, state, Path(aligned.adapter), {"fusion": "learned_mask_random", "tasks": list(tasks),
                                                            "inputs": [r.tag for r in attacked]})
        return {"keep_rate": sum(float(m.sum()) for m in control.values()) / sum(m.numel() for m in control.values())}

    tag = f"fusion/{_inputs_tag(params, tasks)}/learned_mask_random"
    artifact = request(params, run, "learned_mask_random", tag, build, args={"tasks": list(tasks)},
                       values={"merge_params": method_params(params.fusion, lm.merge)},
                       inputs={"learned_mask": learned.artifact, **inputs})
    return ModelRef(tag, aligned.base, str(artifact.path / "adapter"), artifact)


register_fusion("learned_mask", trained=True)(learned_mask_stage)
register_fusion("learned_mask_random", trained=True)(learned_mask_random_stage)
