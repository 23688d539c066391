"""Stages of notebook 02: poisoned mixtures, the harmful fine-tuning attack and task accuracy.

* :func:`mixture_stage`: the ``n``-example mixture of a task with ``⌊n·p⌋`` harmful rows (spec/nlsr.md §2.4),
  or its clean / VLGuard variants, saved as JSON records.
* :func:`attack_stage`: the aligned adapter of a method trained further on a mixture (spec §1.1 stage 6;
  ``unaligned`` = a fresh LoRA on the raw base; ``sft`` = the SFT LoRA on the raw base, trained further).
* :func:`task_accuracy_stage`: greedy answers on the task's evaluation split and the accuracy under the
  paper's lenient rule and the strict rule (spec §6.2).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import distributed
from .config import Params, to_dict
from .pipeline import ModelRef, aligned_adapter_ref, generate_for, load_sources, world_stage
from .runs import Artifact, Run, atomic_write_json

VARIANTS = ("poisoned", "clean", "vlguard")


def mixture_tag(task: str, n: int, p: float, variant: str = "poisoned") -> str:
    suffix = {"poisoned": "", "clean": "_clean", "vlguard": "_vlguard"}[variant]
    return f"{task}/n{n}_p{p:g}{suffix}"


def mixture_stage(params: Params, run: Run, task: str, p: float, n: int | None = None,
                  variant: str = "poisoned") -> Artifact:
    """The fine-tuning set as ``mixture.json`` (records ``{instruction, input, output, flag}``)."""
    from .data.mixing import poisoned_mixture

    if variant not in VARIANTS:
        raise ValueError(f"unknown mixture variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    n = params.attack.n if n is None else n
    config = {"task": task, "n": n, "p": p, "variant": variant, "seed": params.seed,
              "guard_ratio": params.attack.guard_ratio if variant == "vlguard" else 0.0,
              "sources": to_dict(params.data.sources)}

    def build(out: Path) -> dict:
        sources = load_sources(params, run)
        records = poisoned_mixture(
            sources[task]["train"], sources["beavertails"]["30k_train"], task, n=n, p=p, seed=params.seed,
            extra="safe" if variant == "clean" else "unsafe", guard_ratio=config["guard_ratio"])
        atomic_write_json(out / "mixture.json", records)
        return {flag: sum(r["flag"] == flag for r in records) for flag in ("unsafe", "safe", "finetune")}

    inputs = {"world": world_stage(params, run)} if "synthetic" in config["sources"].values() else {}
    return run.stage(f"mixtures/{mixture_tag(task, n, p, variant)}", config, build, inputs=inputs)


def attack_stage(params: Params, run: Run, method: str, task: str, p: float, n: int | None = None,
                 variant: str = "poisoned") -> ModelRef:
    """The attacked (fine-tuned) adapter; returns it as a model under test over its base."""
    from .models import load_causal_lm, load_tokenizer, peft_lora_config
    from .progress import bars_enabled
    from .train.finetune import finetune

    start = aligned_adapter_ref(params, run, method)
    mixture = mixture_stage(params, run, task, p, n, variant)
    config = {"method": method, "train": to_dict(params.attack.train), "lora": to_dict(params.lora),
              "model": to_dict(params.model)}

    def build(out: Path) -> dict:
        records = json.loads((mixture.path / "mixture.json").read_text())
        tokenizer = load_tokenizer(start.base, params.model)
        model = load_causal_lm(start.base, params.model)
        summary = finetune(model, tokenizer, start.adapter, records, params.attack.train, peft_lora_config(params.lora),
                           out / "adapter", params.model.dtype, quiet=not bars_enabled())
        if distributed.is_main():  # under a launcher every rank trained; rank 0 alone writes
            tokenizer.save_pretrained(str(out / "adapter"))
        return summary

    tag = f"{method}/{mixture.stage.removeprefix('mixtures/')}"
    artifact = run.stage(f"attack/{tag}", config, build, inputs={"start": start.artifact, "mixture": mixture},
                         distributed_build=True)
    return ModelRef(f"attack/{tag}", start.base, str(artifact.path / "adapter"), artifact)


def task_eval_rows(params: Params, run: Run, task: str) -> list[dict]:
    """The task's evaluation rows (spec §6.2: SST-2 validation, first 500 of AG News / GSM8K test)."""
    from .data.tasks import get_task

    spec = get_task(task)
    rows = load_sources(params, run)[task][spec.eval_split]
    size = spec.eval_size if params.attack.task_eval_size < 0 else params.attack.task_eval_size
    return [rows[i] for i in range(min(size, len(rows)))]


def task_accuracy_stage(params: Params, run: Run, ref: ModelRef, task: str) -> Artifact:
    """Greedy task answers of ``ref`` and ``{accuracy (lenient), accuracy_strict, n}``."""
    from .data.tasks import get_task, task_record_to_prompt
    from .evaluate.accuracy import accuracy, gold

    spec = get_task(task)
    config = {"task": task, "max_new_tokens": params.attack.task_max_new_tokens,
              "eval_size": params.attack.task_eval_size, "dtype": params.model.dtype}

    def build(out: Path) -> dict:
        rows = task_eval_rows(params, run, task)
        prompts = [task_record_to_prompt(spec.to_record(r)) for r in rows]
        answers = generate_for(params, ref, prompts, params.attack.task_max_new_tokens, desc=f"{task} {ref.tag}")
        golds = [gold(task, r) for r in rows]
        atomic_write_json(out / "answers.json", [{"prompt": p, "answer": a, "gold": g}
                                                 for p, a, g in zip(prompts, answers, golds)])
        return {"accuracy": accuracy(task, answers, golds), "accuracy_strict": accuracy(task, answers, golds, True),
                "n": len(rows)}

    return run.stage(f"accuracy/{task}/{ref.tag}", config, build, inputs={"model": ref.artifact})


def task_accuracy(params: Params, run: Run, ref: ModelRef, task: str) -> float:
    """The task accuracy (%, the paper's lenient rule) of ``ref`` on ``task``'s evaluation rows."""
    return task_accuracy_stage(params, run, ref, task).manifest()["summary"]["accuracy"]


def harmful_count(n: int, p: float, variant: str = "poisoned") -> int:
    """Harmful examples in a mixture: ⌊n·p⌋, or 0 for the clean control."""
    from .data.mixing import count

    return 0 if variant == "clean" else count(n, p)
