"""Alignment (notebook 01; spec/nlsr.md §1.1): a LoRA per method, and the aligned models as models under test."""

from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..config import Params
from ..progress import bars_enabled
from ..runs import Artifact, Run
from .graph import ModelRef, request, stage_kind
from .world import base_location, base_model_stage, is_tiny, load_sources, source_inputs

UNALIGNED = "unaligned"
ROW_SIZES = {"sft": ("sft_size",), "dpo": ("preference_size",), "orpo": ("preference_size",),
             "simpo": ("preference_size",), "kto": ("kto_safe", "kto_unsafe")}


def training_tokens(rows: int, train) -> int:
    """An upper bound of the tokens a training reads: rows × epochs × max_length (``max_steps`` when set: steps ×
    the effective batch, ``effective_batch`` or one process's ``batch_size × grad_accum``)."""
    if train.max_steps > 0:
        return train.max_steps * (train.effective_batch or train.batch_size * train.grad_accum) * train.max_length
    return int(rows * train.epochs * train.max_length)


def sft_location(params: Params, run: Run) -> str:
    """W_sft: the base model with the SFT LoRA merged in (``merged/`` of the SFT artifact)."""
    return str(align_stage(params, run, "sft").path / "merged")


def training_start(params: Params, run: Run, spec) -> tuple[Artifact, str]:
    """Where an alignment method trains from: the SFT artifact and W_sft's folder for a preference method, the base
    model's for SFT."""
    if spec.on_sft_base:
        return align_stage(params, run, "sft"), sft_location(params, run)
    base = base_model_stage(params, run)
    return base, base_location(params, base)


@stage_kind("align", reads=("alignment.{method}", "lora", "model"), consumes=("base_model", "align", "world"),
            device="gpu", args=("method",))
def align_stage(params: Params, run: Run, method: str) -> Artifact:
    """A LoRA aligned with ``method`` (spec/nlsr.md §1.1): SFT on the base (plus the merged W_sft in
    ``merged/``), every preference method on W_sft."""
    from ..models import load_causal_lm, load_tokenizer, merge_adapter, peft_lora_config
    from ..train.alignment import get_method, train_adapter

    spec = get_method(method)
    start, start_dir = training_start(params, run, spec)
    tc = spec.train_config(params)
    sizes = [f"data.{field}" for field in ROW_SIZES[method]]
    inputs, values = source_inputs(params, run, "beavertails", "pku_saferlhf")

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(start_dir, params.model)
        model = load_causal_lm(start_dir, params.model)
        rows = spec.rows(params, load_sources(params, run))
        summary = train_adapter(spec, model, tokenizer, rows, tc, peft_lora_config(params.lora), out / "adapter",
                                params.model.dtype, quiet=not bars_enabled())
        if distributed.is_main():  # under a launcher every rank trained; rank 0 alone writes
            tokenizer.save_pretrained(str(out / "adapter"))
            if method == "sft":
                merge_adapter(start_dir, out / "adapter", out / "merged", params.model)
        return summary

    rows = sum(getattr(params.data, field) for field in ROW_SIZES[method])
    counts = {"trainings": 1, "training_tokens": training_tokens(rows, tc), "model_loads": 2 if method == "sft" else 1}
    return request(params, run, "align", f"align/{method}", build, args={"method": method}, reads=sizes,
                   values=values, inputs={"start": start, **inputs}, counts=counts, distributed_build=True)


def _vaccine(params: Params, method: str, rows: list[dict], tokenizer, tc) -> tuple:
    from ..train.defended import vaccine_method

    v = params.defences.vaccine
    return vaccine_method(method, v.rho, v.site), rows


def _booster(params: Params, method: str, rows: list[dict], tokenizer, tc) -> tuple:
    from ..train.alignment import fit_prompts
    from ..train.defended import booster_method, booster_rows

    b = params.defences.booster
    align, harmful = booster_rows(rows)
    harmful, _ = fit_prompts(harmful, tokenizer, tc.max_length)
    return booster_method(method, harmful, b.lam, b.alpha, b.harmful_batch_size), align


ALIGNMENT_DEFENCES = {"vaccine": _vaccine, "booster": _booster}
"""Alignment-stage defences (spec/defences.md §1–2): name -> ``fn(params, method, rows, tokenizer, train_config)``
returning the defended :class:`~nlsr_lib.train.alignment.AlignmentMethod` and the rows it trains on."""

PASSES = {"vaccine": 2, "booster": 3}
"""Forward-backward passes per step relative to the plain training (spec/defences.md §0), for the plan's counts."""


@stage_kind("defended_align", reads=("alignment.{method}", "lora", "model", "defences.{defence}"),
            consumes=("base_model", "align", "world"), device="gpu", args=("method", "defence"))
def defended_align_stage(params: Params, run: Run, method: str, defence: str) -> Artifact:
    """``method``'s aligned LoRA trained with an alignment-stage defence of :data:`ALIGNMENT_DEFENCES` from the same
    start, data and training settings as :func:`align_stage` (the defence replaces the stage's trainer: Vaccine
    inside the DPO stage as in the NLSR harness, Booster as SFT on the pairs' safe answers with h on their harmful
    ones)."""
    from ..errors import UsageError
    from ..models import load_causal_lm, load_tokenizer, peft_lora_config
    from ..train.alignment import get_method, train_adapter

    if defence not in ALIGNMENT_DEFENCES:
        raise UsageError(f"defended alignment: {defence!r} is not an alignment-stage defence; allowed: "
                         f"{', '.join(ALIGNMENT_DEFENCES)}")
    spec = get_method(method)
    start, start_dir = training_start(params, run, spec)
    tc = spec.train_config(params)
    inputs, values = source_inputs(params, run, "beavertails", "pku_saferlhf")

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(start_dir, params.model)
        model = load_causal_lm(start_dir, params.model)
        defended, rows = ALIGNMENT_DEFENCES[defence](params, method, spec.rows(params, load_sources(params, run)),
                                                     tokenizer, tc)
        summary = train_adapter(defended, model, tokenizer, rows, tc, peft_lora_config(params.lora), out / "adapter",
                                params.model.dtype, quiet=not bars_enabled(), key=f"alignment.{method}")
        if distributed.is_main():
            tokenizer.save_pretrained(str(out / "adapter"))
        return {**summary, "defence": defence}

    rows = sum(getattr(params.data, field) for field in ROW_SIZES[method])
    counts = {"trainings": 1, "training_tokens": PASSES[defence] * training_tokens(rows, tc), "model_loads": 1}
    return request(params, run, "defended_align", f"align/{method}+{defence}", build,
                   args={"method": method, "defence": defence}, reads=[f"data.{f}" for f in ROW_SIZES[method]],
                   values=values, inputs={"start": start, **inputs}, counts=counts, distributed_build=True)


def defended_aligned_ref(params: Params, run: Run, method: str, defence: str) -> ModelRef:
    """The aligned model of :func:`defended_align_stage` in adapter form, over the base its method trains on."""
    from ..train.alignment import get_method

    aligned = defended_align_stage(params, run, method, defence)
    base_dir = sft_location(params, run) if get_method(method).on_sft_base else \
        base_location(params, base_model_stage(params, run))
    return ModelRef(f"{method}+{defence}", base_dir, str(aligned.path / "adapter"), aligned)


def model_ref(params: Params, run: Run, name: str) -> ModelRef:
    """``base`` (the unaligned base), ``sft`` (W_sft) or an alignment method's adapter on W_sft."""
    if name == "base":
        base = base_model_stage(params, run)
        return ModelRef("base", base_location(params, base), None, base)
    sft = align_stage(params, run, "sft")
    if name == "sft":
        return ModelRef("sft", sft_location(params, run), None, sft)
    aligned = align_stage(params, run, name)
    return ModelRef(name, sft_location(params, run), str(aligned.path / "adapter"), aligned)


def aligned_adapter_ref(params: Params, run: Run, method: str) -> ModelRef:
    """A method's aligned model in adapter form: W_sft + its LoRA (``sft``: the raw base + the SFT LoRA;
    ``unaligned``: the bare base). This is what the attack continues and what EXPO extrapolates."""
    base = base_model_stage(params, run)
    if method == UNALIGNED:
        return ModelRef(UNALIGNED, base_location(params, base), None, base)
    aligned = align_stage(params, run, method)
    base_dir = base_location(params, base) if method == "sft" else sft_location(params, run)
    return ModelRef(method, base_dir, str(aligned.path / "adapter"), aligned)


__all__ = ["ALIGNMENT_DEFENCES", "UNALIGNED", "aligned_adapter_ref", "align_stage", "defended_align_stage",
           "defended_aligned_ref", "is_tiny", "model_ref", "sft_location"]
