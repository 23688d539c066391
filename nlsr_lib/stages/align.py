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


@stage_kind("align", reads=("alignment.{method}", "lora", "model"), consumes=("base_model", "align", "world"),
            device="gpu", args=("method",))
def align_stage(params: Params, run: Run, method: str) -> Artifact:
    """A LoRA aligned with ``method`` (spec/nlsr.md §1.1): SFT on the base (plus the merged W_sft in
    ``merged/``), every preference method on W_sft."""
    from ..models import load_causal_lm, load_tokenizer, merge_adapter, peft_lora_config
    from ..train.alignment import get_method, train_adapter

    spec = get_method(method)
    base = base_model_stage(params, run)
    start = align_stage(params, run, "sft") if spec.on_sft_base else base
    start_dir = sft_location(params, run) if spec.on_sft_base else base_location(params, base)
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


__all__ = ["UNALIGNED", "aligned_adapter_ref", "align_stage", "is_tiny", "model_ref", "sft_location"]
