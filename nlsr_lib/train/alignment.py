"""Safety alignment with LoRA through trl (spec/nlsr.md §1.1-1.2).

SFT trains a LoRA on the base model with cross-entropy on response tokens (+EOS) and is merged into W_sft;
each preference method then trains a fresh LoRA on W_sft:

* DPO  ``-log σ(β[(ℓ_c − ℓ_c^ref) − (ℓ_r − ℓ_r^ref)])``, summed log-probs, reference = W_sft (adapter off);
* ORPO ``-ℓ̄_c + λ·(−log σ(O))``, ``O`` the log odds ratio of mean log-probs, no reference;
* SimPO ``-log σ(β(ℓ̄_c − ℓ̄_r) − γ)`` = trl's CPO with ``loss_type="simpo"`` and no BC term (``cpo_alpha=0``);
* KTO  trl's KTO loss (β, desirable/undesirable weights, KL baseline from mismatched pairs).

Every method is one :class:`AlignmentMethod` in :data:`ALIGNMENT_METHODS`: how to build its trl dataset from
the builders of spec §2.1, and its trainer and config. Texts use the single Alpaca template (DESIGN.md §6):
``prompt = alpaca_prompt(instruction, input)``, completion = response; trl adds BOS once and EOS.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed, names
from ..config import Params, TrainConfig
from ..data.builders import build_kto, build_preference_pairs, build_safe_sft
from ..data.templates import alpaca_prompt
from ..registry import Registry


def safe_sft_rows(beavertails_train, n: int) -> list[dict]:
    """trl prompt-completion rows of the first ``n`` safe BeaverTails rows (spec §2.1): the SFT stage's data, and
    Lisa's guide data (spec/defences.md §3, D-L6)."""
    records = build_safe_sft(beavertails_train, n=n)
    return [{"prompt": alpaca_prompt(r["instruction"], r["input"]), "completion": r["output"]} for r in records]


def _sft_rows(params: Params, sources: dict) -> list[dict]:
    return safe_sft_rows(sources["beavertails"]["30k_train"], params.data.sft_size)


def _preference_rows(params: Params, sources: dict) -> list[dict]:
    records = build_preference_pairs(sources["pku_saferlhf"]["train"], n=params.data.preference_size)
    return [{"prompt": alpaca_prompt(r["instruction"], r["input"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in records]


def _kto_rows(params: Params, sources: dict) -> list[dict]:
    records = build_kto(sources["pku_saferlhf"]["train"], n_safe=params.data.kto_safe,
                        n_unsafe=params.data.kto_unsafe)
    return [{"prompt": alpaca_prompt(r["instruction"], r["input"]), "completion": r["output"], "label": r["label"]}
            for r in records]


def _sft_trainer():
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer, SFTConfig, lambda tc: {"max_length": tc.max_length, "completion_only_loss": True}


def _dpo_trainer():
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer, DPOConfig, lambda tc: {"max_length": tc.max_length, "beta": tc.beta, "loss_type": ["sigmoid"]}


def _orpo_trainer():
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    # remove_unused_columns=False: the pairwise collator needs every column (trl sets it and says so otherwise)
    return ORPOTrainer, ORPOConfig, lambda tc: {"max_length": tc.max_length, "beta": tc.beta,
                                                "remove_unused_columns": False}


def _simpo_trainer():
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig, lambda tc: {"max_length": tc.max_length, "loss_type": "simpo", "cpo_alpha": 0.0,
                                              "beta": tc.beta, "simpo_gamma": tc.gamma, "remove_unused_columns": False}


def _kto_trainer():
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer, KTOConfig, lambda tc: {"max_length": tc.max_length, "beta": tc.beta,
                                              "desirable_weight": tc.desirable_weight,
                                              "undesirable_weight": tc.undesirable_weight}


@dataclass(frozen=True)
class AlignmentMethod:
    """One alignment method: its data builder (spec §2.1) and its trl trainer/config factory."""

    name: str
    rows: Callable[[Params, dict], list[dict]]
    trainer: Callable[[], tuple[type, type, Callable[[TrainConfig], dict]]]
    on_sft_base: bool  # True: trains on W_sft; False (sft): trains on the raw base

    def train_config(self, params: Params) -> TrainConfig:
        return getattr(params.alignment, self.name)


ALIGNMENT_METHODS: Registry[AlignmentMethod] = Registry(names.ALIGNMENT_METHODS)
for _method in (AlignmentMethod("sft", _sft_rows, _sft_trainer, on_sft_base=False),
                AlignmentMethod("dpo", _preference_rows, _dpo_trainer, on_sft_base=True),
                AlignmentMethod("orpo", _preference_rows, _orpo_trainer, on_sft_base=True),
                AlignmentMethod("kto", _kto_rows, _kto_trainer, on_sft_base=True),
                AlignmentMethod("simpo", _preference_rows, _simpo_trainer, on_sft_base=True)):
    ALIGNMENT_METHODS.register(_method.name, _method)


def get_method(name: str) -> AlignmentMethod:
    return ALIGNMENT_METHODS[name]


def trainer_arguments(tc: TrainConfig, out_dir: Path, dtype: str, quiet: bool, world_size: int | None = None,
                      key: str = "train") -> dict[str, Any]:
    """transformers/trl arguments shared by every method (no checkpoints: the stage cache owns outputs).

    Gradient accumulation is ``tc.accumulation(world_size)`` (``effective_batch`` over the launcher's processes,
    :mod:`nlsr_lib.distributed`; a :class:`~nlsr_lib.config.ParamsError` naming ``key`` when it does not divide);
    bf16/fp16 autocast follows the model dtype; gradient checkpointing is non-reentrant (the trl trainers call
    ``enable_input_require_grads`` on a PEFT model themselves, which reentrant checkpointing would need)."""
    world_size = distributed.world_size() if world_size is None else world_size
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if tc.gradient_checkpointing else {}
    return dict(
        output_dir=str(out_dir), learning_rate=tc.learning_rate, num_train_epochs=tc.epochs, max_steps=tc.max_steps,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.accumulation(world_size, key),
        lr_scheduler_type=tc.scheduler, warmup_steps=tc.warmup_ratio, seed=tc.seed, data_seed=tc.seed,
        report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=quiet,
        use_cpu=not torch.cuda.is_available(), bf16=dtype == "bfloat16", fp16=dtype == "float16",
        dataloader_num_workers=0, gradient_checkpointing=tc.gradient_checkpointing, **checkpointing,
    )


def adapter_dtype(tc: TrainConfig, dtype: str) -> torch.dtype:
    """The dtype a trained adapter is saved in: the base model's (``adapter_dtype: model``; DESIGN.md §6 "stored
    weights in the model's dtype") or fp32. PEFT trains the LoRA weights of a bf16/fp16 base in fp32
    (``autocast_adapter_dtype``, as LLaMA-Factory does; 2e-6 updates would vanish in bf16 weights): only the saved
    copy is cast."""
    from ..models import DTYPES

    return torch.float32 if tc.adapter_dtype == "float32" else DTYPES[dtype]


def save_adapter(model, out_dir: Path, dtype: torch.dtype) -> None:
    """``model.save_pretrained`` (PEFT, safetensors) with the LoRA weights cast to ``dtype``; the model's own
    parameters are untouched (a cast copy of the adapter weights is what is written)."""
    state = model.state_dict()
    cast = {k for k, v in state.items() if "lora_" in k and v.is_floating_point() and v.dtype != dtype}
    if not cast:
        model.save_pretrained(str(out_dir))
        return
    model.save_pretrained(str(out_dir), state_dict={k: v.to(dtype) if k in cast else v for k, v in state.items()})


COMPLETION_KEYS = ("completion", "chosen", "rejected")


def fit_prompts(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """``rows`` with every prompt cut so that its completions keep their share of ``max_length`` tokens, as
    LLaMA-Factory (the reference code's trainer) cuts a long example: when prompt + completion exceed
    ``max_length``, the prompt keeps at most ``max_length - min(completion, max_length // 2)`` tokens from its start
    (a completion shorter than half the window keeps all of itself, a longer one at least half the window; trl then
    cuts the completion's end). Returns the rows and the number of prompts cut.

    trl itself cuts only the completion (or the whole sequence from its end), so a prompt as long as ``max_length``
    left no completion token: a zero-token mean log-prob is 0/0 (ORPO, SimPO: NaN loss at the first step),
    chosen and rejected become the same sequence (DPO: no gradient), an SFT batch of such rows has no label (NaN).
    The length counts the prompt's special tokens (BOS) and the completion's EOS; a prompt is cut at a token
    boundary of its text (the fast tokenizer's offsets). At the paper's 1024 tokens only a prompt longer than 512
    tokens can be cut."""
    out, cut = [], 0
    for row in rows:
        prompt = row["prompt"]
        completion = max(len(tokenizer(row[k], add_special_tokens=False)["input_ids"]) + 1
                         for k in COMPLETION_KEYS if k in row)
        full = len(tokenizer(prompt)["input_ids"])
        budget = max_length - min(completion, max_length // 2)
        if full + completion <= max_length or full <= budget:
            out.append(row)
            continue
        plain = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        keep = max(1, budget - (full - len(plain["input_ids"])))
        if tokenizer.is_fast:
            text = prompt[:plain["offset_mapping"][keep][0]]
        else:  # pragma: no cover - every tokenizer of the profiles is fast
            text = tokenizer.decode(plain["input_ids"][:keep])
        out.append({**row, "prompt": text})
        cut += 1
    return out, cut


def train_adapter(method: AlignmentMethod, model, tokenizer, rows: list[dict], tc: TrainConfig, lora_config,
                  out_dir: Path, dtype: str = "float32", quiet: bool = False, key: str | None = None) -> dict:
    """Train a fresh LoRA on ``model`` with ``method`` and save the PEFT adapter to ``out_dir`` (LoRA weights in
    :func:`adapter_dtype`). ``key`` names ``tc`` in errors (``alignment.dpo``, ``attack.train``).

    Prompts too long for ``tc.max_length`` are cut from their end first (:func:`fit_prompts`).

    Returns a summary: number of examples, optimizer steps, the final logged training loss, the batch as trained
    (per-device batch, processes, gradient accumulation and the effective batch: examples per step) and the number
    of prompts cut.
    """
    from datasets import Dataset

    from .guards import finite_loss_callback

    key = key or f"alignment.{method.name}"
    rows, prompts_cut = fit_prompts(rows, tokenizer, tc.max_length)
    world_size = distributed.world_size()
    trainer_cls, config_cls, method_kwargs = method.trainer()
    work = out_dir.parent / f".{out_dir.name}-trainer"
    args = config_cls(**trainer_arguments(tc, work, dtype, quiet, world_size, key), **method_kwargs(tc))
    args.logging_nan_inf_filter = False  # log NaN/inf losses as they are, for the check below (logging only)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora_config, callbacks=[finite_loss_callback(f"{method.name} alignment")])
    if quiet:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    saved = adapter_dtype(tc, dtype)
    if trainer.accelerator.is_main_process:  # one writer under `accelerate launch`; no pickled training_args
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), out_dir, saved)
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accumulation = args.gradient_accumulation_steps
    record = getattr(trainer, "defence_record", None)  # a defence's trainer says what it did (spec/defences.md)
    extra = {"defence_record": record()} if record is not None else {}
    return {**extra, "examples": len(rows), "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "last_logged_loss": logged[-1] if logged else None, "per_device_batch": tc.batch_size,
            "processes": world_size, "grad_accum": accumulation,
            "effective_batch": tc.batch_size * accumulation * world_size, "adapter_dtype": str(saved).split(".")[-1],
            "prompts_cut": prompts_cut}
