"""The harmful fine-tuning attack (notebook 02; spec/nlsr.md §1.1 stage 6, §2.4).

* :func:`mixture_stage`: the ``n``-example mixture of a task with ``⌊n·p⌋`` harmful rows (spec/nlsr.md §2.4),
  or its clean variant, or with safe rows mixed in (the ``safety_mixing`` defence), saved as JSON records.
* :func:`attack_stage`: the aligned adapter of a method trained further on a mixture (``unaligned`` = a fresh
  LoRA on the raw base; ``sft`` = the SFT LoRA on the raw base, trained further); with ``defence``, the adapter of
  an alignment-stage defence trained further, or the attack trained by a fine-tuning-stage defence's trainer.
* :func:`attack_points`: every attacked model notebook 02 measures, in its order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..config import Params
from ..progress import bars_enabled
from ..runs import Artifact, Run, atomic_write_json
from .align import ALIGNMENT_DEFENCES, UNALIGNED, aligned_adapter_ref, defended_aligned_ref, training_tokens
from .graph import ModelRef, request, stage_kind
from .world import load_source, source_inputs

VARIANTS = ("poisoned", "clean", "safety_mixing")


def mixture_tag(task: str, n: int, p: float, variant: str = "poisoned") -> str:
    suffix = {"poisoned": "", "clean": "_clean", "safety_mixing": "_safety_mixing"}[variant]
    return f"{task}/n{n}_p{p:g}{suffix}"


@stage_kind("mixture", reads=("seed",), consumes=("world",), args=("task", "p", "n", "variant"))
def mixture_stage(params: Params, run: Run, task: str, p: float, n: int | None = None,
                  variant: str = "poisoned") -> Artifact:
    """The fine-tuning set as ``mixture.json`` (records ``{instruction, input, output, flag}``)."""
    from ..data.mixing import poisoned_mixture

    if variant not in VARIANTS:
        raise ValueError(f"unknown mixture variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    n = params.attack.n if n is None else n
    inputs, values = source_inputs(params, run, task, "beavertails")
    reads = ("defences.safety_mixing",) if variant == "safety_mixing" else ()

    def build(out: Path) -> dict:
        beaver = load_source(params, run, "beavertails")["30k_train"]
        records = poisoned_mixture(
            load_source(params, run, task)["train"], beaver, task, n=n, p=p, seed=params.seed,
            extra="safe" if variant == "clean" else "unsafe")
        if variant == "safety_mixing":  # spec/defences.md §6: the first safe rows, NLSR's merge_vlguard_data
            from ..data.mixing import beavertails_pool
            from ..data.safety_mixing import mix_safety

            m = params.defences.safety_mixing
            records, _ = mix_safety(records, beavertails_pool(beaver, safe=True), mode=m.mode, fraction=m.fraction,
                                    count=m.count or None, seed=params.seed)
        atomic_write_json(out / "mixture.json", records)
        return {flag: sum(r["flag"] == flag for r in records) for flag in ("unsafe", "safe", "finetune")}

    return request(params, run, "mixture", f"mixtures/{mixture_tag(task, n, p, variant)}", build,
                   args={"task": task, "n": n, "p": p, "variant": variant}, reads=reads,
                   values={**values, "guard_ratio": 0.0}, inputs=inputs)  # guard_ratio: the key the mixtures were
    # built under before safety mixing became a defence of its own (defences.safety_mixing); kept so they stay cached


def _lisa(params: Params, run: Run):
    from ..train.alignment import safe_sft_rows
    from ..train.defended import lisa_method

    cfg = params.defences.lisa
    rows = safe_sft_rows(load_source(params, run, "beavertails")["30k_train"], cfg.guide_size)
    return lisa_method(rows, k_align=cfg.k_align, k_user=cfg.k_user, rho=cfg.rho,
                       prox_warmup_frac=cfg.prox_warmup_frac, user_batches=cfg.user_batches)


def _constrained_sft(params: Params, run: Run):
    from ..train.defended import constrained_sft_method

    c = params.defences.constrained_sft
    return constrained_sft_method(beta=c.beta, bias_factor=c.bias_factor,
                                  first_token_bias_factor=c.first_token_bias_factor, bias_length=c.bias_length,
                                  min_weight=c.min_weight, reference=c.reference, reduction=c.reduction)


FINETUNING_TRAINERS = {"lisa": _lisa, "constrained_sft": _constrained_sft}
"""Fine-tuning-stage defences that replace the attack's trainer (spec/defences.md §3, §5): name ->
``fn(params, run)`` returning the :class:`~nlsr_lib.train.alignment.AlignmentMethod` the attack trains with."""

ATTACK_DEFENCES = (*ALIGNMENT_DEFENCES, *FINETUNING_TRAINERS)
"""The ``defence`` values :func:`attack_stage` takes: an alignment-stage defence (the attack continues its adapter)
or a trainer of :data:`FINETUNING_TRAINERS`."""


@stage_kind("attack", reads=("attack.train", "lora", "model"), consumes=("align", "defended_align", "mixture"),
            device="gpu", args=("method", "task", "p", "n", "variant", "defence"))
def attack_stage(params: Params, run: Run, method: str, task: str, p: float, n: int | None = None,
                 variant: str = "poisoned", defence: str | None = None) -> ModelRef:
    """The attacked (fine-tuned) adapter; returns it as a model under test over its base. ``defence``: the attack
    continues the adapter of an alignment-stage defence (``vaccine``, ``booster``), or trains with a fine-tuning-stage
    defence's trainer (``lisa``, ``constrained_sft``); see :data:`ATTACK_DEFENCES`."""
    from ..errors import UsageError
    from ..models import load_causal_lm, load_tokenizer, peft_lora_config
    from ..train.finetune import finetune

    if defence is not None and defence not in ATTACK_DEFENCES:
        raise UsageError(f"attack: defence {defence!r} is not allowed; allowed: {', '.join(ATTACK_DEFENCES)}")
    if defence in ALIGNMENT_DEFENCES:
        start = defended_aligned_ref(params, run, method, defence)
    else:
        start = aligned_adapter_ref(params, run, method)
    mixture = mixture_stage(params, run, task, p, n, variant)
    trainer = FINETUNING_TRAINERS.get(defence)

    def build(out: Path) -> dict:
        records = json.loads((mixture.path / "mixture.json").read_text())
        tokenizer = load_tokenizer(start.base, params.model)
        model = load_causal_lm(start.base, params.model)
        summary = finetune(model, tokenizer, start.adapter, records, params.attack.train, peft_lora_config(params.lora),
                           out / "adapter", params.model.dtype, quiet=not bars_enabled(),
                           method=trainer(params, run) if trainer else None)
        if distributed.is_main():  # under a launcher every rank trained; rank 0 alone writes
            tokenizer.save_pretrained(str(out / "adapter"))
        return {**summary, "defence": defence} if defence else summary

    tag = f"{method}+{defence}" if defence else method
    tag = f"{tag}/{mixture.stage.removeprefix('mixtures/')}"
    n_rows = params.attack.n if n is None else n
    counts = {"trainings": 1, "training_tokens": training_tokens(n_rows, params.attack.train), "model_loads": 1}
    args, reads, inputs, values = {"method": method}, (), {}, {}
    if trainer:  # only a defended attack carries these, so every undefended attack keeps its fingerprint
        args, reads = {"method": method, "defence": defence}, (f"defences.{defence}",)
        inputs, values = source_inputs(params, run, "beavertails")
    artifact = request(params, run, "attack", f"attack/{tag}", build, args=args, reads=reads, values=values,
                       inputs={"start": start.artifact, "mixture": mixture, **inputs}, counts=counts,
                       distributed_build=True)
    return ModelRef(f"attack/{tag}", start.base, str(artifact.path / "adapter"), artifact)


def harmful_count(n: int, p: float, variant: str = "poisoned") -> int:
    """Harmful examples in a mixture: ⌊n·p⌋, or 0 for the clean control."""
    from ..data.mixing import count

    return 0 if variant == "clean" else count(n, p)


@dataclass(frozen=True)
class AttackPoint:
    """One attacked model of notebook 02: ``method`` attacked on ``task`` with ``n`` examples at ratio ``p``."""

    method: str
    task: str
    p: float
    n: int
    variant: str = "poisoned"

    def ref(self, params: Params, run: Run) -> ModelRef:
        return attack_stage(params, run, self.method, self.task, self.p, self.n, self.variant)


def attack_points(params: Params) -> list[AttackPoint]:
    """Notebook 02's attacked models in its order: DPO on every task at every ratio plus the clean control; every
    other method (and the unaligned base) on SST-2 at ``attack.methods_ratio``; DPO on SST-2 at every other size."""
    a = params.attack
    points = []
    for task in a.tasks:
        points += [AttackPoint("dpo", task, p, a.n) for p in a.poison_ratios]
        points.append(AttackPoint("dpo", task, a.size_sweep_ratio, a.n, "clean"))
    for method in (*[m for m in params.alignment.methods if m != "dpo"], UNALIGNED):
        points.append(AttackPoint(method, "sst2", a.methods_ratio, a.n))
    points += [AttackPoint("dpo", "sst2", a.size_sweep_ratio, n) for n in a.sizes if n != a.n]
    return points


def headline_points(params: Params) -> list[AttackPoint]:
    """The attacked models of the headline tables, run at every training seed (:mod:`nlsr_lib.seeds`): DPO at
    ``attack.n`` on every task at ``size_sweep_ratio`` (the paper's p = 0.1) with its clean control, and on
    SST-2 at every ratio; in :func:`attack_points` order."""
    a = params.attack
    return [point for point in attack_points(params)
            if point.method == "dpo" and point.n == a.n and (point.task == "sst2" or point.p == a.size_sweep_ratio)]
