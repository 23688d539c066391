"""Typed, frozen parameters loaded from YAML (DESIGN.md §7).

A params file is a nested mapping whose sections mirror the dataclasses below. ``extends: other.yaml``
inherits another file (deep merge, the child wins). Loading is strict: an unknown key, a value of the wrong
type or a value outside its allowed range raises :class:`ParamsError` naming the dotted key and what is
allowed. Numbers written as ``1e-5`` (a string to YAML 1.1) are accepted where a float is expected; NaN and
infinities (``.nan``, ``.inf``) are refused everywhere. A YAML syntax error names the file and the line.

Cross checks (``_CROSS_CHECKS``) refuse what would pass field by field and fail late, hours into a run: an
unknown device, ``fusion.method`` / ``ablation.method`` not trained by ``alignment.methods``,
``lora.target_modules`` that match no module of the model (:func:`check_target_modules`, when the model's
architecture is known on this machine: :func:`model_module_names`), and local data sources that are missing, lack
a split or lack the dataset's columns (:func:`_check_sources`, from headers only). Where a relative params path
points is decided by :func:`resolve_params_path`; a relative data-source path is relative to the params file that
declares it (:class:`SourcesConfig`, :func:`_resolve_sources`), and so is a model given as a relative path
(``model.name``, ``judges.moderation.model``: :func:`_resolve_model_paths`).

Every field's metadata may carry ``range=(lo, hi)`` (inclusive; ``None`` = unbounded), ``open_hi=True`` (hi
excluded) or ``choices=``: a tuple, or a registry family (:mod:`nlsr_lib.names`, or a light module's
:class:`~nlsr_lib.registry.Registry` such as :data:`~nlsr_lib.data.tasks.TASKS`), whose errors read
``key: unknown <kind> 'x'; registered: a, b, c``; on a list field every item must be a choice. :func:`_check_value`
enforces them. None of this imports torch: ``import nlsr_lib.config`` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data.tasks import TASKS
from .errors import NlsrError
from .names import (ALIGNMENT_METHODS, BENCHMARKS, CORRECTIONS, DECODERS, DEFENCES, GENERATION_BACKENDS, JUDGES,
                    KEYWORD_LISTS, LLM_PROTOCOLS, MERGE_METHODS, REGION_SCORERS, RESTORE_STRATEGIES, SIMILARITIES,
                    FIELD_DEFENCES, WRAPPERS)
from .registry import Names, Registry, unknown_message

SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFERENCE_METHODS = ALIGNMENT_METHODS.names()[1:]  # every alignment method but sft (they train on W_sft)


class ParamsError(NlsrError, ValueError):
    """A params file or override is invalid; the message names the key (or the file and line) and what is allowed."""


def _f(default: Any, *, range: tuple | None = None, choices: tuple | Names | Registry | None = None,
       open_hi: bool = False, doc: str = "") -> Any:
    meta = {"range": range, "choices": choices, "open_hi": open_hi, "doc": doc}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta)


def _sub(cls: type) -> Any:
    return field(default_factory=cls)


# --------------------------------------------------------------------------------------------- world / data
@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the synthetic world (spec/synthetic_world.md §2); only used when a source is ``synthetic``."""

    seed: int = _f(0)
    beavertails_train: int = _f(6000, range=(1, None))
    beavertails_test: int = _f(1500, range=(1, None))
    unsafe_fraction: float = _f(0.5, range=(0.0, 1.0))
    saferlhf_train: int = _f(3000, range=(1, None))
    saferlhf_test: int = _f(600, range=(1, None))
    sst2_train: int = _f(3000, range=(1, None))
    sst2_validation: int = _f(872, range=(1, None))
    ag_news_train: int = _f(3000, range=(1, None))
    ag_news_test: int = _f(500, range=(1, None))
    gsm8k_train: int = _f(3000, range=(1, None))
    gsm8k_test: int = _f(500, range=(1, None))
    alpaca_train: int = _f(2000, range=(1, None))
    eval_set_size: int = _f(100, range=(1, None))


SourceValue = str | dict[str, str]
"""A data source: ``synthetic``, a hub id, a local path, or a mapping of split name to local file."""


@dataclass(frozen=True)
class SourcesConfig:
    """Where each dataset comes from (:mod:`nlsr_lib.data.loaders`): ``synthetic`` (the embedded world), a hub id,
    a ``save_to_disk`` folder, one data file (only for a dataset that needs one split: ``alpaca``), or a mapping
    ``{split: file}`` naming a file for every split the dataset needs (``loaders.SPLITS``). Files are ``.tsv``,
    ``.csv``, ``.json``, ``.jsonl`` or ``.parquet``, each optionally ``.gz``-compressed.

    A value that exists as a path (relative to the folder of the params file that declares it, or absolute, or
    ``~``) is local, and loaded params carry it as an absolute path (:func:`_resolve_sources`); a value that looks
    like a path (starts with ``./``, ``../``, ``/``, ``~`` or ends in a data-file suffix) but does not exist is an
    error; anything else is a hub id. Through ``extends:`` a mapping merges split by split like any mapping (the
    child wins). Loading params checks every local file's header or first record (:func:`_check_sources`)."""

    beavertails: SourceValue = _f("synthetic")
    pku_saferlhf: SourceValue = _f("synthetic")
    sst2: SourceValue = _f("synthetic")
    ag_news: SourceValue = _f("synthetic")
    gsm8k: SourceValue = _f("synthetic")
    alpaca: SourceValue = _f("synthetic")
    alpaca_eval: SourceValue = _f("synthetic", doc="the Alpaca task's evaluation set (AlpacaEval's 805 prompts with "
                                               "reference answers; synthetic: the world's counterpart)")


@dataclass(frozen=True)
class DataConfig:
    """Dataset builders of spec/nlsr.md §2.1 and the evaluation slices of §6.1."""

    sources: SourcesConfig = _sub(SourcesConfig)
    sft_size: int = _f(2000, range=(1, None), doc="first n is_safe BeaverTails rows (§2.1)")
    preference_size: int = _f(2000, range=(1, None), doc="first n exactly-one-safe SafeRLHF pairs (§2.1)")
    kto_safe: int = _f(1000, range=(0, None))
    kto_unsafe: int = _f(1000, range=(0, None))
    safety_test_start: int = _f(0, range=(0, None), doc="unsafe 30k_test prompts [start, end) = test slice (§6.1)")
    safety_test_end: int = _f(1000, range=(1, None))
    safety_val_start: int = _f(1000, range=(0, None), doc="EXPO-alpha validation slice (§3)")
    safety_val_end: int = _f(1500, range=(1, None))


# --------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class TokenizerConfig:
    """BPE tokenizer trained on the world (spec/synthetic_world.md §3); tiny profile only."""

    vocab_size: int = _f(2048, range=(64, None))


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Llama built from scratch (spec/synthetic_world.md §3)."""

    hidden_size: int = _f(128, range=(8, None))
    intermediate_size: int = _f(384, range=(8, None))
    num_hidden_layers: int = _f(4, range=(1, None))
    num_attention_heads: int = _f(4, range=(1, None))
    num_key_value_heads: int = _f(4, range=(1, None))
    max_position_embeddings: int = _f(256, range=(16, None))


@dataclass(frozen=True)
class ModelConfig:
    """The base model: ``tiny`` (built and pretrained here) or a hub id / local path."""

    name: str = _f("tiny", doc="'tiny', a hub id or a local folder (./x or ../x: relative to the params file that "
                                "declares it)")
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    device_map: str = _f("auto", doc="'auto' (every GPU, or the CPU if there is none), 'cpu', 'cuda', 'cuda:N', 'mps', "
                                     "or a transformers strategy: 'balanced', 'balanced_low_0', 'sequential'")
    trust_remote_code: bool = _f(False)
    tiny: TinyModelConfig = _sub(TinyModelConfig)


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the tiny base (spec/synthetic_world.md §3): causal LM on Alpaca-formatted world text."""

    steps: int = _f(800, range=(1, None))
    batch_size: int = _f(32, range=(1, None))
    learning_rate: float = _f(3e-3, range=(0.0, None))
    weight_decay: float = _f(0.01, range=(0.0, None))
    warmup_steps: int = _f(50, range=(0, None))
    max_length: int = _f(128, range=(8, None))
    refusal_fraction: float = _f(0.1, range=(0.0, 1.0), doc="share of harmful prompts answered with a refusal")
    task_examples: int = _f(5000, range=(0, None), doc="examples per downstream task in the corpus")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA of spec/nlsr.md §1.2: r=128, alpha=256, dropout 0, all seven projections."""

    r: int = _f(128, range=(1, None))
    alpha: int = _f(256, range=(1, None))
    dropout: float = _f(0.0, range=(0.0, 1.0), open_hi=True)
    target_modules: tuple[str, ...] = _f(SEVEN_PROJECTIONS)


@dataclass(frozen=True)
class TrainConfig:
    """One trl training run (spec/nlsr.md §1.2). ``max_steps`` > 0 overrides epochs; ``effective_batch`` > 0
    overrides ``grad_accum`` (:meth:`accumulation`), so one params file gives the paper's batch on any number of
    processes."""

    learning_rate: float = _f(1e-4, range=(0.0, None))
    epochs: float = _f(1.0, range=(0.0, None))
    max_steps: int = _f(-1, range=(-1, None))
    batch_size: int = _f(1, range=(1, None), doc="per-device (per-process) batch")
    grad_accum: int = _f(1, range=(1, None), doc="used when effective_batch is 0")
    effective_batch: int = _f(0, range=(0, None),
                              doc="examples per optimizer step over every process; 0: batch_size × grad_accum × "
                                  "processes. Set: grad_accum = effective_batch / (batch_size × processes)")
    adapter_dtype: str = _f("model", choices=("model", "float32"),
                            doc="dtype of the saved adapter: the base model's (LoRA trains in fp32, saved cast) | "
                                "float32 (keeps updates below the bf16 resolution)")
    scheduler: str = _f("cosine", choices=("cosine", "linear", "constant", "constant_with_warmup"))
    warmup_ratio: float = _f(0.1, range=(0.0, 1.0))
    max_length: int = _f(1024, range=(8, None))
    beta: float = _f(0.1, range=(0.0, None), doc="DPO/KTO beta, ORPO lambda, SimPO beta")
    gamma: float = _f(1.0, range=(0.0, None), doc="SimPO target margin gamma")
    gradient_checkpointing: bool = _f(False, doc="trade compute for memory on large models")
    desirable_weight: float = _f(1.0, range=(0.0, None))
    undesirable_weight: float = _f(1.0, range=(0.0, None))
    seed: int = _f(42)

    def accumulation(self, world_size: int = 1, key: str = "train") -> int:
        """Gradient-accumulation steps on ``world_size`` processes: ``grad_accum``, or with ``effective_batch``
        set ``effective_batch / (batch_size × world_size)``; :class:`ParamsError` naming ``key`` when that is not a
        positive whole number."""
        if self.effective_batch <= 0:
            return self.grad_accum
        per_step = self.batch_size * world_size
        if self.effective_batch % per_step:
            raise ParamsError(
                f"{key}.effective_batch: {self.effective_batch} is not divisible by {key}.batch_size × processes = "
                f"{self.batch_size} × {world_size} = {per_step}; choose a per-device batch_size (or a number of "
                f"processes) whose product divides {self.effective_batch}")
        return self.effective_batch // per_step

    def effective(self, world_size: int = 1) -> int:
        """Examples per optimizer step over ``world_size`` processes."""
        return self.batch_size * self.accumulation(world_size) * world_size


def _train(**kw: Any) -> Any:
    return field(default_factory=lambda: TrainConfig(**kw))


@dataclass(frozen=True)
class AlignmentConfig:
    """Alignment stages (spec/nlsr.md §1.1-1.2): SFT LoRA merged into W_sft, then preference LoRAs on W_sft."""

    methods: tuple[str, ...] = _f(ALIGNMENT_METHODS.names(), choices=ALIGNMENT_METHODS)
    sft: TrainConfig = _train(learning_rate=1e-4, epochs=1.0, batch_size=1, grad_accum=16)
    dpo: TrainConfig = _train(learning_rate=2e-6, epochs=1.0, batch_size=1, grad_accum=8, beta=0.1)
    orpo: TrainConfig = _train(learning_rate=2e-4, epochs=1.0, batch_size=1, grad_accum=8, beta=0.5)
    kto: TrainConfig = _train(learning_rate=2e-6, epochs=1.0, batch_size=2, grad_accum=4, beta=0.1)  # trl: > 1
    simpo: TrainConfig = _train(learning_rate=2e-6, epochs=1.0, batch_size=1, grad_accum=8, beta=2.0, gamma=1.0)


# --------------------------------------------------------------------------------------------- attack, EXPO
@dataclass(frozen=True)
class AttackConfig:
    """Harmful fine-tuning (spec/nlsr.md §1.2, §2.4): the aligned adapter trained further on a poisoned mixture."""

    tasks: tuple[str, ...] = _f(TASKS.names(), choices=TASKS)
    n: int = _f(1000, range=(1, None), doc="fine-tuning examples per mixture")
    poison_ratios: tuple[float, ...] = _f((0.0, 0.01, 0.05, 0.1, 0.2, 0.3))
    sizes: tuple[int, ...] = _f((100, 500, 1000, 2000, 2500), doc="mixture sizes n of the size sweep")
    size_sweep_ratio: float = _f(0.1, range=(0.0, 1.0), doc="poison ratio held fixed in the size sweep")
    methods_ratio: float = _f(0.05, range=(0.0, 1.0), doc="ratio at which every alignment method is attacked")
    train: TrainConfig = _train(learning_rate=2e-6, epochs=10.0, batch_size=1, grad_accum=4)
    task_max_new_tokens: int = _f(200, range=(1, None), doc="decoding budget of task evaluation (§6.2)")
    task_eval_size: int = _f(-1, range=(-1, None), doc="-1: the task's own evaluation size (§6.2)")


@dataclass(frozen=True)
class ExpoConfig:
    """EXPO (spec/nlsr.md §3, DESIGN.md §6): alpha grid per method, chosen on the validation slice."""

    mode: str = _f("paper", choices=("paper", "factor_scaling"))
    alphas: tuple[float, ...] = _f((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    methods: tuple[str, ...] = _f(ALIGNMENT_METHODS.names(), choices=ALIGNMENT_METHODS)


# --------------------------------------------------------------------------------------------- safety regions
@dataclass(frozen=True)
class RegionCalibrationConfig:
    """Calibration set of the region scorers (spec/nlsr.md §2.5): n rows sampled with the seed."""

    n: int = _f(2000, range=(1, None), doc="rows sampled (all rows if fewer)")
    prompts: int = _f(-1, range=(-1, None), doc="distinct SafeRLHF test prompts the reference answers, the first k in "
                                                "dataset order (the pool the n rows are sampled from); -1: every one "
                                                "(the paper)")
    seed: int = _f(42)
    max_length: int = _f(1024, range=(8, None), doc="prompt + response + EOS tokens, cut at the end")
    batch_size: int = _f(8, range=(1, None), doc="forward batch; gradient scorers still use one sample at a time")
    filter: str = _f("judge", choices=("judge", "none"),
                     doc="judge: keep the answers the primary judge finds safe (§2.5); none: keep every answer")


@dataclass(frozen=True)
class SnipConfig:
    """Gradient scorers (spec/nlsr.md §4.3-4.4, DESIGN.md §6 "SNIP gradients")."""

    cumulative_grad: bool = _f(False, doc="true: never zero gradients between samples (reference code)")
    preference_beta: float = _f(0.1, range=(0.0, None), doc="DPO beta of preference_snip")


@dataclass(frozen=True)
class SetDifferenceConfig:
    """Top-q safety minus top-p utility entries per matrix (spec/merging.md §3.2)."""

    q: float = _f(0.1, range=(0.0, 1.0), doc="share of entries in the safety top set")
    p: float = _f(0.1, range=(0.0, 1.0), doc="share of entries in the utility top set")


@dataclass(frozen=True)
class RegionsConfig:
    """Safety-critical region scorers -> masks (spec/nlsr.md §4, DESIGN.md §6)."""

    scorers: tuple[str, ...] = _f(REGION_SCORERS.names(), choices=REGION_SCORERS,
                                  doc="masks notebook 04 builds and compares; each scorer is its own stage")
    mask_sparsity: float = _f(0.8, range=(0.0, 1.0), open_hi=True, doc="pruned share; the mask keeps ⌈(1-s)·n⌉")
    rank_keep_ratio: float = _f(0.8, range=(0.0, 1.0), doc="low_rank: q = ⌊min(o, k)·ratio⌋ directions kept")
    svd: str = _f("exact", choices=("exact", "randomized"), doc="low_rank eigendecomposition")
    svd_niter: int = _f(20, range=(0, None), doc="power iterations of svd: randomized")
    tie_rule: str = _f("index", choices=("index", "reference"), doc="exact count, ties by index | reference code")
    positions: str = _f("response", choices=("response", "predicting"),
                        doc="statistics at response tokens | at the positions predicting them")
    propagate: bool = _f(False, doc="wanda/low_rank: process layers sequentially on modified layers (reference)")
    seed: int = _f(42, doc="random scorer, randomized SVD, reference tie rule's random zeros")
    snip: SnipConfig = _sub(SnipConfig)
    set_difference: SetDifferenceConfig = _sub(SetDifferenceConfig)
    calibration: RegionCalibrationConfig = _sub(RegionCalibrationConfig)


# --------------------------------------------------------------------------------------------- model fusion
@dataclass(frozen=True)
class LearnedMaskConfig:
    """SOMF's learned safety mask (spec/somf.md §2, §2.7, §6): concrete-mask logits over the task vectors, trained
    with the DPO loss on safety preference pairs; the SOMF defaults."""

    temperature: float = _f(0.5, range=(0.0, None), doc="concrete (relaxed Bernoulli) temperature T, fixed")
    init_logit: float = _f(0.0, doc="L at init: keep-probability σ(0) = 0.5")
    rescale: str = _f("mean", choices=("mean", "none"), doc="τ ⊙ m / mean(m) per tensor (SOMF) | τ ⊙ m")
    detach_mean: bool = _f(False, doc="stop the gradient through mean(m) (SOMF: it flows)")
    beta: float = _f(0.1, range=(0.0, None), doc="DPO β (sigmoid loss)")
    learning_rate: float = _f(5e-3, range=(0.0, None), doc="AdamW on the logits, one task (SOMF 5e-3)")
    learning_rate_multi: float = _f(1e-2, range=(0.0, None), doc="AdamW on the logits, several tasks (SOMF 1e-2)")
    epochs: float = _f(3.0, range=(0.0, None), open_hi=False)
    batch_size: int = _f(16, range=(1, None), doc="preference pairs per step (SOMF: effective batch 16)")
    micro_batch: int = _f(0, range=(0, None),
                          doc="pairs per forward/backward, gradients accumulated over the step's batch (same "
                              "gradient, one micro-batch of activations); 0 = the whole batch in one pass")
    logprob_chunk: int = _f(0, range=(0, None),
                            doc="response tokens per log-softmax chunk (recomputed in backward: never the full "
                                "[batch, seq, vocab] fp32 logits); 0 = full logits in one pass")
    gradient_checkpointing: bool = _f(False, doc="recompute decoder layers in backward (non-reentrant)")
    n_pairs: int = _f(5000, range=(1, None), doc="safety preference pairs (SOMF: 5,135 from the SafeRLHF test split)")
    max_length: int = _f(1024, range=(8, None), doc="tokens per sequence (SOMF cutoff_len 1024)")
    merge: str = _f("task_arithmetic", choices=MERGE_METHODS,
                    doc="Merge of the masked task vectors when there are several (one task: identity, somf §3.6)")
    export: str = _f("threshold", choices=("threshold", "bernoulli", "soft"),
                     doc="b = 1[σ(L) > 0.5] (somf §6.3) | one seeded Bernoulli(σ(L)) sample (SOMF code) | σ(L)")
    seed: int = _f(42, doc="the concrete samples, the pair order and the Bernoulli export")


@dataclass(frozen=True)
class FusionConfig:
    """Model fusion (spec/somf.md §3, spec/merging.md §1-2; nlsr_lib/fusion): the papers' values, SOMF's where the
    papers leave a choice open."""

    operators: tuple[str, ...] = _f(MERGE_METHODS.names(), choices=MERGE_METHODS)
    tasks: tuple[str, ...] = _f(("sst2", "ag_news", "gsm8k"), choices=TASKS,
                                doc="the attacked task adapters fused (SOMF's three tasks): each alone, then all")
    lam: float = _f(0.3, range=(0.0, None), doc="λ of task arithmetic, DARE and Consensus TA (SOMF multi-task 0.3)")
    ties_lambda: float = _f(1.0, range=(0.0, None), doc="λ of TIES / Consensus TIES (paper 1.0; SOMF 0.4 with sum)")
    ties_density: float = _f(0.2, range=(0.0, 1.0), doc="TIES keeps the top ⌊density·D⌋ magnitudes")
    ties_scope: str = _f("global", choices=("global", "tensor"),
                         doc="trim over the whole model (paper, SOMF) | per tensor (mergekit, PEFT)")
    ties_disjoint: str = _f("mean", choices=("mean", "sum"), doc="disjoint mean (paper) | dis-sum (SOMF code)")
    consensus_ties_disjoint: str = _f("sum", choices=("mean", "sum"),
                                      doc="Consensus TIES: dis-sum (the TALL code it cites) | disjoint mean")
    dare_drop: float = _f(0.2, range=(0.0, 1.0), open_hi=True, doc="DARE drop rate p (SOMF multi-task 0.2)")
    dare_seed: int = _f(42, doc="DARE masks: one generator per (seed, tensor, task)")
    consensus_k: int = _f(2, range=(0, None), doc="keep weights used by >= k tasks (TALL masks paper)")
    consensus_lambda_t: float = _f(0.6, range=(0.0, None), doc="TALL mask λ_t (paper grid 0.2-0.6)")
    single_task_identity: bool = _f(False, doc="n = 1: WA/TA/TIES return τ unchanged (SOMF code)")
    region_where: str = _f("outside", choices=("inside", "outside"), doc="fuse inside | outside the safety region")
    head_fraction: float = _f(0.1, range=(0.0, 1.0), doc="share of attention heads forming the head-level region")
    max_shard_size: int = _f(5_000_000_000, range=(1, None), doc="bytes per output safetensors shard")
    device: str = _f("cpu", doc="where merges compute: 'cpu', 'cuda' or 'cuda:N'")
    method: str = _f("dpo", choices=PREFERENCE_METHODS, doc="notebook 06 fuses this method's adapters")
    poison_ratio: float = _f(0.1, range=(0.0, 1.0), doc="notebook 06 fuses the task adapters attacked at this ratio")
    region_operator: str = _f("task_arithmetic", choices=MERGE_METHODS,
                              doc="the operator whose update the region fusions restrict")
    learned_mask: LearnedMaskConfig = _sub(LearnedMaskConfig)


# --------------------------------------------------------------------------------------------- restoration
@dataclass(frozen=True)
class SafeLoraConfig:
    """SafeLoRA baseline (spec/nlsr.md §5.6, §7; DESIGN.md §6): V = the aligned adapter's update κ·B·A."""

    variant: str = _f("published", choices=("published", "nlsr_code"),
                      doc="project B where cos <= tau (paper) | A (input side) where cos < tau (NLSR code)")
    projection: str = _f("approx", choices=("approx", "exact"),
                         doc="C = V Vᵀ/‖V‖_F (published code) | orthogonal projector onto col V")
    tau: float = _f(0.6, range=(-1.0, 1.0), doc="cosine threshold; the NLSR paper's SafeLoRA runs use 0.6 (§7)")
    masked: bool = _f(False, doc="mask the aligned factors first (the NLSR code's mask_scale)")
    update: str = _f("adapter", choices=("adapter", "finetuning_delta"),
                     doc="project the attacked adapter's whole update κBA (spec) | only what fine-tuning added, "
                         "κBA − κ̂B̂Â, keeping the aligned update (published variant only)")


@dataclass(frozen=True)
class RestaConfig:
    """RESTA baseline (spec/somf.md §3.5): the attacked adapter plus gamma × the safety vector."""

    gamma: float = _f(0.2, range=(0.0, None), doc="SOMF's PEFT runs: 0.2")
    space: str = _f("weight", choices=("weight", "factor"),
                    doc="exact weight-space sum as a rank-2r LoRA (paper) | A+γÂ, B+γB̂ (SOMF code)")


@dataclass(frozen=True)
class RestoreConfig:
    """NLSR restoration (spec/nlsr.md §5; canonical run §1.1: adaptive, ρ = 0.5, ε = 0.2, seed 42) and the
    training-free baselines (nlsr_lib/restore)."""

    defences: tuple[str, ...] = _f(("none", "nlsr", "safelora", "resta", "aligned_adapter", "random_mask"),
                                   choices=DEFENCES, doc="the defences the notebooks run (default: every one)")
    strategy: str = _f("adaptive", choices=RESTORE_STRATEGIES,
                       doc="probability-based layer pruning (§5.5) | threshold (§5.4) | layers (§5.7) | all")
    correction: str = _f("neuron", choices=CORRECTIONS,
                         doc="masked entries take the reference values (§5.3) | whole selected modules")
    similarity: str = _f("gram", choices=SIMILARITIES, doc="Gram identity (exact, fast) | d_out×d_in products")
    prune_rate: float = _f(0.5, range=(0.0, 1.0), doc="ρ: expected share of modules restored (adaptive)")
    epsilon: float = _f(0.2, range=(0.0, 1.0), doc="ε: probabilities ρ±ε, linear in similarity rank (adaptive)")
    favor: str = _f("low_similarity", choices=("low_similarity", "high_similarity"),
                    doc="less similar modules more likely restored (DESIGN §6) | more similar (reference code)")
    tau: float = _f(0.6, range=(-1.0, 1.0),
                    doc="threshold strategy: restore modules with similarity < tau (EXPO sweep 0.6-0.9, §5.4)")
    layers: tuple[int, ...] = _f((0, 0), doc="layers strategy: decoder layers [a, b)")
    seed: int = _f(42, doc="the adaptive draw and the random-mask control")
    safelora: SafeLoraConfig = _sub(SafeLoraConfig)
    resta: RestaConfig = _sub(RestaConfig)


@dataclass(frozen=True)
class SafetyMixingConfig:
    """Safety-data mixing (spec/defences.md §6, D-M1): safe BeaverTails rows put into the user's fine-tuning data."""

    mode: str = _f("replace", choices=("replace", "append", "count"),
                   doc="replace: ⌊n·g⌋ safe rows replace benign ones (NLSR's merge_vlguard_data); append: added "
                       "(Vaccine, Bianchi et al.); count: an absolute number replacing benign rows (Lisa)")
    fraction: float = _f(0.1, range=(0.0, 1.0), open_hi=True, doc="g: the safe share of n (replace, append)")
    count: int = _f(0, range=(0, None), doc="safe rows for mode count (or append with count > 0); 0 = use g")


@dataclass(frozen=True)
class VaccineConfig:
    """Vaccine, perturbation-aware alignment (spec/defences.md §1): the alignment stage's trainer with the worst-case
    perturbation of total size ρ at every decoder layer (in the NLSR harness, inside the DPO stage, D-V4)."""

    rho: float = _f(2.0, range=(0.0, None), doc="ρ: the perturbation's global L2 size (Vaccine README, --rho 2)")
    site: str = _f("attention", choices=("attention", "block_output"),
                   doc="D-V1: each decoder layer's self-attention output (code, every reported number) | the whole "
                       "decoder layer's output (the paper's wording)")


@dataclass(frozen=True)
class BoosterConfig:
    """Booster, attenuating harmful perturbation (spec/defences.md §2): the alignment stage's adapter trained with
    f = SFT on the safe (chosen) answers of the preference pairs and h = SFT on the harmful (rejected) answers to the
    same prompts (the code's pairing, D-B5: disjoint from the attack rows and the evaluation prompts)."""

    lam: float = _f(5.0, range=(0.0, None), doc="λ: the regulariser weight (script/alignment/smooth_align.sh: 5)")
    alpha: float = _f(0.1, range=(0.0, None), doc="α: the simulated harmful step's length (script and train.py: 0.1)")
    harmful_batch_size: int = _f(0, range=(0, None), doc="D-B4: harmful rows per step; 0 = the alignment batch size")


@dataclass(frozen=True)
class LisaConfig:
    """Lisa, bi-state optimisation during the user's fine-tuning (spec/defences.md §3); counts are optimizer steps
    (D-L1)."""

    k_align: int = _f(100, range=(0, None), doc="K_a: alignment (guide) steps per round (lisa_poison_ratio.sh: 100)")
    k_user: int = _f(900, range=(0, None), doc="K_f: user steps per round (lisa_poison_ratio.sh: 900)")
    rho: float = _f(1.0, range=(0.0, None), doc="ρ: the proximal intensity, term (ρ/2)·‖θ − anchor‖² (script: 1)")
    prox_warmup_frac: float = _f(0.1, range=(0.0, 1.0), doc="D-L3: no proximal term in the first share of steps")
    user_batches: str = _f("discard", choices=("discard",),
                           doc="D-L2: the user batch drawn on an alignment step is discarded (code)")
    guide_size: int = _f(100, range=(1, None),
                         doc="guide rows: the first safe BeaverTails 30k_train rows, the SFT stage's data (D-L6; "
                             "the NLSR harness uses 100, Lisa's code 10,000)")


@dataclass(frozen=True)
class ConstrainedSFTConfig:
    """Token-wise constrained fine-tuning (Qi et al.; spec/defences.md §5) against the aligned adapter."""

    beta: float = _f(0.1, range=(0.0, None), doc="β after the first bias_length response tokens")
    bias_factor: float = _f(20.0, range=(0.0, None), doc="β_t = β·bias_factor for 1 ≤ t < bias_length")
    first_token_bias_factor: float = _f(5.0, range=(0.0, None), doc="β_0 = β·first_token_bias_factor")
    bias_length: int = _f(5, range=(0, None), doc="response tokens with the strengthened constraint")
    min_weight: float = _f(1e-3, range=(0.0, None), doc="D-C2: floor of the token weight (0: the paper's gradient)")
    reference: str = _f("precompute", choices=("precompute", "online"),
                        doc="D-C3: reference log-probs cached before training | recomputed each step")
    reduction: str = _f("micro_batch", choices=("micro_batch", "accumulated"),
                        doc="D-C4: token mean per micro-batch (code) | over the accumulated batch")


@dataclass(frozen=True)
class AntidoteConfig:
    """Antidote, one-shot pruning after fine-tuning (spec/defences.md §4): Wanda scores of the fine-tuned LoRA factors
    on harmful calibration rows, the top ``dense_ratio`` of each row zeroed."""

    dense_ratio: float = _f(0.1, range=(0.0, 1.0), open_hi=True,
                            doc="δ: the share of each row marked harmful (train.py and the SST-2 script: 0.1; AG News "
                                "and GSM8K scripts 0.05)")
    group: str = _f("row", choices=("row", "matrix"), doc="D-A2: top-k per output row (Wanda, code) | per matrix")
    calibration_start: int = _f(5000, range=(0, None),
                                doc="first unsafe BeaverTails 30k_train row of the calibration set (code: 5000; "
                                    "D-A5: after every attack's harmful rows)")
    calibration_size: int = _f(2000, range=(1, None), doc="calibration rows, start ≤ i < start + size (D-B6)")
    batch_size: int = _f(1, range=(1, None), doc="calibration sequences per forward pass (right-padded; code: 1)")
    max_length: int = _f(2048, range=(8, None), doc="calibration sequences are cut to this many tokens (code: 2048)")


@dataclass(frozen=True)
class DefencesConfig:
    """The defences of the field beside NLSR (spec/defences.md), by family: alignment stage (``vaccine``,
    ``booster``), fine-tuning stage (``lisa``, ``safety_mixing``, ``constrained_sft``), post-fine-tuning
    (``antidote``). Notebook 05 runs ``methods`` on the headline attacks beside the training-free defences of
    ``restore.defences``."""

    methods: tuple[str, ...] = _f(("vaccine", "booster", "lisa", "safety_mixing", "constrained_sft", "antidote"),
                                  choices=FIELD_DEFENCES, doc="the field's defences notebook 05 runs (default: all)")
    scope: str = _f("headline", choices=("headline", "main"),
                    doc="the attacks they defend: every headline attack (DPO on every task at p = 0.1 and on SST-2 "
                        "at every ratio) | the main one only (DPO on the first task at p ≈ 0.1; quick checks)")
    vaccine: VaccineConfig = _sub(VaccineConfig)
    booster: BoosterConfig = _sub(BoosterConfig)
    lisa: LisaConfig = _sub(LisaConfig)
    safety_mixing: SafetyMixingConfig = _sub(SafetyMixingConfig)
    constrained_sft: ConstrainedSFTConfig = _sub(ConstrainedSFTConfig)
    antidote: AntidoteConfig = _sub(AntidoteConfig)


@dataclass(frozen=True)
class AblationConfig:
    """Notebook 07: one-factor sweeps around the canonical NLSR run (spec/nlsr.md §5, §9; DESIGN.md §6) on the
    adapter of ``method`` attacked on ``task`` at ``poison_ratio``; every other parameter keeps its profile value."""

    method: str = _f("dpo", choices=ALIGNMENT_METHODS)
    task: str = _f("sst2", choices=TASKS)
    poison_ratio: float = _f(0.1, range=(0.0, 1.0))
    mask_sparsity: tuple[float, ...] = _f((0.5, 0.7, 0.8, 0.9, 0.95))
    rank_keep_ratio: tuple[float, ...] = _f((0.2, 0.5, 0.8, 0.95))
    prune_rate: tuple[float, ...] = _f((0.1, 0.3, 0.5, 0.7, 0.9))
    epsilon: tuple[float, ...] = _f((0.0, 0.1, 0.2, 0.3, 0.4))
    tau: tuple[float, ...] = _f((0.2, 0.4, 0.6, 0.8, 0.9))
    scorers: tuple[str, ...] = _f(("wanda", "snip", "preference_snip", "low_rank", "random"), choices=REGION_SCORERS)
    seeds: tuple[int, ...] = _f((42, 43, 44, 45, 46), doc="the adaptive draw and the random mask")


# --------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class GenerationConfig:
    """Greedy batched generation (spec/nlsr.md §6.1: left padding, max_new_tokens 512) by an engine
    (DESIGN.md §5). Responses do not depend on ``backend``, ``batch_size``, ``token_budget`` or ``decoder``, which
    only set the speed, so the generation stages do not read them (their cache survives a change of engine)."""

    max_new_tokens: int = _f(512, range=(1, None))
    batch_size: int = _f(16, range=(1, None), doc="most rows in one batch (the paper generated 16 at a time)")
    token_budget: int = _f(0, range=(0, None), doc="padded prompt + new tokens per batch; 0 = from free GPU "
                                                   "memory (a third of it as KV cache), or batch_size rows on CPU")
    backend: str = _f("hf", choices=GENERATION_BACKENDS, doc="'hf' (transformers, adapters swapped in place) or "
                                                             "'vllm' (multi-LoRA; optional extra [vllm])")
    decoder: str = _f("compact", choices=DECODERS, doc="the hf backend's loop: 'compact' (finished rows leave the "
                                                       "batch) or 'transformers' (model.generate)")


@dataclass(frozen=True)
class ModerationConfig:
    """The moderation judge (spec/nlsr.md §6.1): beaver-dam-7b, or the tiny classifier trained on the world."""

    model: str = _f("tiny", doc="'tiny' or a hub id / local folder of a beaver-dam-style classifier (./x or ../x: "
                                "relative to the params file that declares it)")
    threshold: float = _f(0.5, range=(0.0, 1.0))
    max_length: int = _f(256, range=(8, None))
    batch_size: int = _f(16, range=(1, None), doc="texts per forward pass (sorted by length, so padding is small)")
    dtype: str = _f("bfloat16", choices=("float32", "bfloat16", "float16"),
                    doc="weights and logits at judging (probabilities are fp32); the tiny profile judges in float32")
    device: str = _f("auto", doc="'auto' (the current GPU if there is one, else the CPU), 'cpu', 'cuda', 'cuda:N', "
                                 "'mps'")
    train_steps: int = _f(400, range=(1, None), doc="tiny classifier only")
    train_batch_size: int = _f(32, range=(1, None))
    learning_rate: float = _f(2e-3, range=(0.0, None))
    hidden_size: int = _f(64, range=(8, None))
    num_hidden_layers: int = _f(2, range=(1, None))
    min_heldout_accuracy: float = _f(0.95, range=(0.0, 1.0), doc="the tiny judge refuses to be used below this")

    def __post_init__(self) -> None:
        if self.device != "auto" and not _DEVICE.fullmatch(self.device):
            raise ParamsError(f"judges.moderation.device: {self.device!r} is not allowed; choose one of auto, cpu, "
                              "cuda, cuda:N (N = 0, 1, ...), mps")


@dataclass(frozen=True)
class KeywordConfig:
    """Refusal keyword matching (spec/evaluation.md §2.1)."""

    phrases: str = _f("nlsr", choices=KEYWORD_LISTS,
                   doc="nlsr: first-person refusals only (GCG-29's harm words such as 'illegal' and 'unethical' fire "
                       "on compliances that mention the harm, §2.1 failure mode 1); gcg29 (the AdvBench / HarmBench "
                       "list), jbb13, rd12, mi29, gcg_demo10: the published lists, matched as published")
    normalise_quotes: bool = _f(False, doc="map U+2019 to ' before matching the published lists (a deviation, "
                                           "recorded; the nlsr list always normalises)")


@dataclass(frozen=True)
class LLMJudgeConfig:
    """An LLM judge over an OpenAI-compatible chat-completions API (spec/evaluation.md §2, §5). The endpoint, the
    judge model and the key come only from the environment variables named here, never from params; temperature
    and max_tokens are each protocol's published ones (0; StrongREJECT's 1000, XSTest's 16, ...)."""

    protocol: str = _f("strongreject", choices=LLM_PROTOCOLS,
                       doc="strongreject (rubric score), harmbench (yes/no classifier), jailbreakbench, llama_guard "
                           "(text form), xstest (3-class), pairwise (SOMF's preference judge against a reference)")
    base_url_env: str = _f("NLSR_JUDGE_BASE_URL", doc="falls back to OPENAI_BASE_URL")
    model_env: str = _f("NLSR_JUDGE_MODEL")
    api_key_env: str = _f("NLSR_JUDGE_API_KEY", doc="falls back to OPENAI_API_KEY")
    concurrency: int = _f(8, range=(1, None), doc="requests in flight at once")
    max_retries: int = _f(2, range=(0, None), doc="the openai client's retries (429, 5xx, timeouts; backoff §5)")
    timeout_s: float = _f(60.0, range=(0.0, None), open_hi=False)
    swap_positions: bool = _f(False, doc="pairwise: judge both orders (SOMF did not, spec/somf.md §6.14)")
    price_prompt_per_1m: float = _f(0.0, range=(0.0, None), doc="USD per million prompt tokens (usage summary)")
    price_completion_per_1m: float = _f(0.0, range=(0.0, None))


@dataclass(frozen=True)
class LlamaGuardConfig:
    """A local Llama-Guard-3-style classifier (spec/evaluation.md §2.4)."""

    model: str = _f("", doc="hub id or local folder (e.g. meta-llama/Llama-Guard-3-8B); '' = not configured")
    dtype: str = _f("bfloat16", choices=("float32", "bfloat16", "float16"))
    device: str = _f("auto")
    batch_size: int = _f(8, range=(1, None))
    max_new_tokens: int = _f(10, range=(2, None), doc="the reply: 'safe', or 'unsafe' and a category line")


@dataclass(frozen=True)
class JudgesConfig:
    primary: str = _f("moderation", choices=JUDGES)
    enabled: tuple[str, ...] = _f(("moderation", "keyword"), choices=JUDGES)
    moderation: ModerationConfig = _sub(ModerationConfig)
    keyword: KeywordConfig = _sub(KeywordConfig)
    llm: LLMJudgeConfig = _sub(LLMJudgeConfig)
    llama_guard: LlamaGuardConfig = _sub(LlamaGuardConfig)


SOMF_SETS = ("somf_catqa", "somf_beavertails", "somf_shadow", "somf_harmfulqa", "somf_dangerousqa")


@dataclass(frozen=True)
class EvaluationConfig:
    """The safety evaluation suite (spec/evaluation.md; spec/somf.md §4): harmful-prompt benchmarks judged by every
    judge of ``judges``, red-team wrappers, over-refusal and general capability, for the models notebooks 01, 05 and
    06 report. The BeaverTails ``30k_test`` slice of ``data`` stays the primary measure of every table."""

    benchmarks: tuple[str, ...] = _f(SOMF_SETS + ("advbench", "harmbench_test", "jailbreakbench", "strongreject",
                                                  "malicious_instruct"), choices=BENCHMARKS,
                                     doc="SOMF's five sets (spec/somf.md §4.1) and the field's standard sets")
    judges: tuple[str, ...] = _f(("moderation", "keyword"), choices=JUDGES,
                                 doc="judges of every benchmark (llm and llama_guard need their configuration)")
    data_dir: str = _f("", doc="folder of local copies in ../shared/data's layout (./x or ../x: relative to the "
                               "params file); '' = the tiny world's counterparts where the profile's BeaverTails "
                               "is the world (real profiles need the copies; each set's hub id is in "
                               "nlsr_lib.evaluate.benchmarks)")
    tiny_size: int = _f(100, range=(1, None), doc="prompts per benchmark in the tiny world's counterparts")
    limit: int = _f(0, range=(0, None), doc="evaluate the first N prompts of each set (0 = all; SOMF: all)")
    wrappers: tuple[str, ...] = _f(("identity",), choices=WRAPPERS,
                                   doc="red-team prompt wrappers (spec/evaluation.md §3): every benchmark also runs "
                                       "through each; identity = the prompts as written")
    over_refusal: str = _f("xstest", choices=("", "xstest"), doc="over-refusal set ('' = none)")
    capability: tuple[str, ...] = _f((), doc="lm-evaluation-harness tasks (spec §4): 'tiny_facts' (the world's "
                                             "multiple choice) or COPA-format jsonl files under capability_dir")
    capability_dir: str = _f("", doc="local COPA-format task files: <dir>/<task>.jsonl")
    capability_batch_size: int = _f(8, range=(1, None))
    tiny_capability_size: int = _f(200, range=(1, None), doc="rows of the tiny world's multiple-choice task")
    bootstrap_seed: int = _f(0, doc="Cohen's kappa's 1,000-resample bootstrap (spec §2.6)")

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ParamsError("evaluation.benchmarks: at least one benchmark is needed")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ParamsError(f"evaluation.benchmarks: {list(self.benchmarks)} names a benchmark twice")
        if "xstest" in self.benchmarks:
            raise ParamsError("evaluation.benchmarks: xstest is an over-refusal set; set evaluation.over_refusal")


@dataclass(frozen=True)
class Params:
    """All parameters of one profile."""

    profile: str = _f("tiny")
    seed: int = _f(42, doc="the data seed: pretraining order, mixture shuffles (fixed across training seeds)")
    seeds: tuple[int, ...] = _f((42,), doc="training seeds (nlsr_lib/seeds.py): each training (alignment, attack, "
                                           "learned mask) runs once per seed, overriding its config's seed; the "
                                           "world, base model, judge and evaluation sets stay fixed")
    seed_scope: str = _f("headline", choices=("headline", "all"),
                         doc="headline: the headline tables at every seed, the rest at seeds[0]; all: every table "
                             "at every seed")
    world: WorldConfig = _sub(WorldConfig)
    data: DataConfig = _sub(DataConfig)
    tokenizer: TokenizerConfig = _sub(TokenizerConfig)
    model: ModelConfig = _sub(ModelConfig)
    pretrain: PretrainConfig = _sub(PretrainConfig)
    lora: LoraConfig = _sub(LoraConfig)
    alignment: AlignmentConfig = _sub(AlignmentConfig)
    attack: AttackConfig = _sub(AttackConfig)
    expo: ExpoConfig = _sub(ExpoConfig)
    regions: RegionsConfig = _sub(RegionsConfig)
    fusion: FusionConfig = _sub(FusionConfig)
    restore: RestoreConfig = _sub(RestoreConfig)
    defences: DefencesConfig = _sub(DefencesConfig)
    ablation: AblationConfig = _sub(AblationConfig)
    generation: GenerationConfig = _sub(GenerationConfig)
    judges: JudgesConfig = _sub(JudgesConfig)
    evaluation: EvaluationConfig = _sub(EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------- loading
_CROSS_CHECKS: list[typing.Callable[[Params], None]] = []


def _cross_check(fn: typing.Callable[[Params], None]) -> typing.Callable[[Params], None]:
    _CROSS_CHECKS.append(fn)
    return fn


@_cross_check
def _check_defences(p: Params) -> None:
    """What a single field range cannot say about the field's defences (spec/defences.md §1–5)."""
    d = p.defences
    for key, value in (("constrained_sft.beta", d.constrained_sft.beta),
                       ("constrained_sft.bias_factor", d.constrained_sft.bias_factor),
                       ("constrained_sft.first_token_bias_factor", d.constrained_sft.first_token_bias_factor)):
        if not value > 0:
            raise ParamsError(f"defences.{key}: {value!r}; allowed: a number > 0 (spec/defences.md §5)")
    if d.constrained_sft.bias_length < 1:
        raise ParamsError(f"defences.constrained_sft.bias_length: {d.constrained_sft.bias_length}; allowed: >= 1")
    if not d.constrained_sft.min_weight < 2:
        raise ParamsError(f"defences.constrained_sft.min_weight: {d.constrained_sft.min_weight!r}; allowed: "
                          "0 <= min_weight < 2 (token weights never exceed 2)")
    if d.lisa.k_align + d.lisa.k_user == 0:
        raise ParamsError("defences.lisa: k_align + k_user = 0; allowed: at least one step per round")
    if d.lisa.prox_warmup_frac >= 1:
        raise ParamsError(f"defences.lisa.prox_warmup_frac: {d.lisa.prox_warmup_frac!r}; allowed: 0 <= x < 1")


@_cross_check
def _check_methods(p: Params) -> None:
    if "sft" not in p.alignment.methods:
        raise ParamsError("alignment.methods must include 'sft': every preference method trains on W_sft")
    if p.judges.primary not in p.judges.enabled:
        raise ParamsError(f"judges.primary {p.judges.primary!r} must be one of judges.enabled {list(p.judges.enabled)}")


@_cross_check
def _check_seeds(p: Params) -> None:
    if not p.seeds:
        raise ParamsError("seeds: at least one training seed is needed, e.g. seeds: [42, 43, 44]")
    if len(set(p.seeds)) != len(p.seeds) or any(s < 0 for s in p.seeds):
        raise ParamsError(f"seeds: {list(p.seeds)}; allowed: distinct non-negative integers")


@_cross_check
def _check_attack_and_expo(p: Params) -> None:
    for ratio in p.attack.poison_ratios:
        if not 0.0 <= ratio <= 1.0:
            raise ParamsError(f"attack.poison_ratios: {ratio} is outside [0, 1]")
    if any(size < 1 for size in p.attack.sizes):
        raise ParamsError("attack.sizes: every size must be >= 1")
    for method in p.expo.methods:
        if method not in p.alignment.methods:
            raise ParamsError(f"expo.methods: {method!r} is not among alignment.methods {list(p.alignment.methods)}")
    if any(a < 0 for a in p.expo.alphas):
        raise ParamsError("expo.alphas: every alpha must be >= 0")


@_cross_check
def _check_restore(p: Params) -> None:
    r = p.restore
    if len(r.layers) != 2 or not 0 <= r.layers[0] <= r.layers[1]:
        raise ParamsError(f"restore.layers: expected [a, b] with 0 <= a <= b (layers a <= i < b), got {list(r.layers)}")
    if r.strategy == "layers" and r.layers[0] == r.layers[1]:
        raise ParamsError(f"restore.layers: strategy 'layers' needs [a, b) with a < b, got {list(r.layers)}")
    if r.safelora.variant == "nlsr_code" and r.safelora.update != "adapter":
        raise ParamsError("restore.safelora.update: 'finetuning_delta' needs variant 'published' (B side)")
    if r.safelora.variant == "nlsr_code" and r.safelora.projection != "approx":
        raise ParamsError("restore.safelora.projection: variant 'nlsr_code' has only 'approx' (C = V Vᵀ/‖V‖_F)")


@_cross_check
def _check_ablation(p: Params) -> None:
    a = p.ablation
    for key in ("mask_sparsity", "rank_keep_ratio", "prune_rate", "epsilon", "tau"):
        lo, hi = (-1.0, 1.0) if key == "tau" else (0.0, 1.0)
        for v in getattr(a, key):
            if not lo <= v <= hi or (key == "mask_sparsity" and v == 1.0):
                raise ParamsError(f"ablation.{key}: {v} is outside [{lo:g}, {hi:g}]" +
                                  (" (a sparsity of 1 keeps nothing)" if key == "mask_sparsity" else ""))


@_cross_check
def _check_slices(p: Params) -> None:
    d = p.data
    if not d.safety_test_start < d.safety_test_end:
        raise ParamsError("data.safety_test_start must be < data.safety_test_end")
    if not d.safety_val_start < d.safety_val_end:
        raise ParamsError("data.safety_val_start must be < data.safety_val_end")
    if d.safety_val_start < d.safety_test_end and d.safety_test_start < d.safety_val_end:
        raise ParamsError("data.safety_val_* and data.safety_test_* slices overlap; they must be disjoint")
    if p.regions.calibration.prompts == 0:
        raise ParamsError("regions.calibration.prompts: 0 answers no prompt; use -1 (every prompt) or a count >= 1")
    t = p.model.tiny
    if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
        raise ParamsError("model.tiny: hidden_size must be divisible by num_attention_heads, and heads by kv heads")
    for name in p.lora.target_modules:
        if not name:
            raise ParamsError("lora.target_modules: empty module name")


_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@_cross_check
def _check_devices(p: Params) -> None:
    """``model.device_map`` goes to ``from_pretrained(device_map=...)`` (``auto`` and ``cpu`` through
    :func:`nlsr_lib.models.resolve_device_map`); ``fusion.device`` to ``torch.device``. Whether the device exists
    is checked where it is used: params are often validated on a machine without the GPUs."""
    dm = p.model.device_map
    if dm not in DEVICE_MAP_STRATEGIES and not _DEVICE.fullmatch(dm):
        raise ParamsError(f"model.device_map: {dm!r} is not allowed; choose one of auto, cpu, cuda, cuda:N (N = 0, 1, "
                          "...), mps, or a transformers strategy: balanced, balanced_low_0, sequential")
    if not _DEVICE.fullmatch(p.fusion.device):
        raise ParamsError(f"fusion.device: {p.fusion.device!r} is not allowed; choose one of cpu, cuda, cuda:N, mps")


@_cross_check
def _check_fused_tasks_are_attacked(p: Params) -> None:
    missing = [t for t in p.fusion.tasks if t not in p.attack.tasks]
    if missing:
        raise ParamsError(f"fusion.tasks {missing} are not attacked: every fused task adapter comes from notebook 02's "
                          f"attacks; allowed: tasks of attack.tasks {list(p.attack.tasks)}")
    if not p.fusion.tasks:
        raise ParamsError("fusion.tasks is empty; name at least one task of attack.tasks")


@_cross_check
def _check_methods_are_aligned(p: Params) -> None:
    """Notebooks 06 and 07 work on the adapters of one alignment method, which notebook 01 must train."""
    for key, method in (("fusion.method", p.fusion.method), ("ablation.method", p.ablation.method)):
        if method not in p.alignment.methods:
            raise ParamsError(f"{key}: {method!r} is not among alignment.methods {list(p.alignment.methods)}; "
                              f"choose one of them or add it there")


@_cross_check
def _check_training_batches(p: Params) -> None:
    """Batches trl would refuse, or that cannot make the effective batch, hours into a run: KTO's per-device batch
    must be > 1, and ``effective_batch`` must divide by ``batch_size`` × processes (``WORLD_SIZE`` of the launcher
    this runs under, 1 otherwise; checked again at training time)."""
    from .distributed import world_size

    if "kto" in p.alignment.methods and p.alignment.kto.batch_size < 2:
        raise ParamsError(
            f"alignment.kto.batch_size: {p.alignment.kto.batch_size} is too small; trl's KTOTrainer needs a "
            "per-device batch > 1 (\"Actual (not effective) batch size must be > 1\"): its KL baseline pairs each "
            "completion with another example's prompt of the same per-device batch, and with one example the KL "
            "term equals the implied reward. Use batch_size >= 2 (effective_batch keeps the paper's 8)")
    trainings = [(f"alignment.{m}", getattr(p.alignment, m)) for m in p.alignment.methods]
    for key, tc in trainings + [("attack.train", p.attack.train)]:
        tc.accumulation(world_size(), key)


@_cross_check
def _check_lora_targets(p: Params) -> None:
    names = model_module_names(p.model)
    if names is not None:
        check_target_modules(p.lora.target_modules, names, p.model.name)


@_cross_check
def _check_sources(p: Params) -> None:
    """Every local data source exists, has a file (or saved split) for each split its dataset needs, and carries
    the dataset's columns: :func:`nlsr_lib.data.loaders.check_local_source` reads only headers / first records.
    Hub ids are not checked (nothing is fetched)."""
    from .data.loaders import SourceError, check_local_source

    for name, value in to_dict(p.data.sources).items():
        try:
            check_local_source(name, value)
        except SourceError as err:
            raise ParamsError(f"data.sources.{name}: {err}") from None


# --------------------------------------------------------------------------------------------- LoRA targets
# Architectures whose module names are known without building them (transformers' Llama layout; Mistral and
# Qwen2 use the same names). Anything else is built on the meta device, which allocates no memory.
LLAMA_LIKE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _llama_like_module_names(num_hidden_layers: int) -> tuple[str, ...]:
    """The LoRA-adaptable modules (linear layers and the embedding) of a Llama-layout causal LM."""
    names = ["model.embed_tokens"]
    for i in range(num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    return tuple(names + ["lm_head"])


@functools.lru_cache(maxsize=16)
def _meta_module_names(config_source: str, trust_remote_code: bool) -> tuple[str, ...] | None:
    """Adaptable module names of the causal LM that ``config_source`` (a directory with config.json, or a hub id
    found in the local cache) describes, built on the meta device (no weights); None if that is impossible."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(config_source, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        try:
            from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers

            kinds += (Conv1D,)
        except ImportError:  # pragma: no cover - older/newer transformers
            pass
        return tuple(name for name, module in model.named_modules() if isinstance(module, kinds))
    except Exception:  # unknown architecture, unreadable config: no check rather than a false error
        return None


def _local_model_config(name: str) -> tuple[str, dict] | None:
    """(where, config.json contents) of model ``name`` when it is on this machine: a directory holding config.json,
    or a hub id whose config.json is in the local Hugging Face cache. Never touches the network."""
    import json

    candidate = Path(name).expanduser()
    path = candidate / "config.json" if candidate.is_dir() else None
    if path is None and not candidate.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # not a valid repo id, no cache
            path = None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (str(candidate) if candidate.is_dir() else name), config if isinstance(config, dict) else {}


def model_module_names(model: ModelConfig) -> tuple[str, ...] | None:
    """The full names of the LoRA-adaptable modules (linear layers, embeddings) of the profile's model, or None when
    they cannot be known here — then :func:`check_target_modules` is skipped.

    * ``tiny``: the Llama built from ``model.tiny`` (nlsr_lib.tiny): the seven projections per layer, the
      embedding and ``lm_head``.
    * a local directory with ``config.json``, or a hub id whose ``config.json`` is already in the local Hugging Face
      cache: Llama, Mistral and Qwen2 from their known layout; other architectures are built from the config on
      the meta device (no weights, no memory), unless ``model.trust_remote_code`` is on (no code is run to
      validate params).
    * a hub id not in the local cache (offline, or never downloaded): None, the check is skipped; the model's own
      loading reports a bad target later.
    """
    if model.name == "tiny":
        return _llama_like_module_names(model.tiny.num_hidden_layers)
    found = _local_model_config(model.name)
    if found is None:
        return None
    source, config = found
    architectures = config.get("architectures") or []
    layers = config.get("num_hidden_layers")
    if len(architectures) == 1 and architectures[0] in LLAMA_LIKE_ARCHITECTURES and isinstance(layers, int):
        return _llama_like_module_names(layers)
    if model.trust_remote_code:
        return None
    return _meta_module_names(source, False)


def check_target_modules(target_modules: typing.Iterable[str], module_names: typing.Iterable[str],
                         model: str = "the model", key: str = "lora.target_modules") -> None:
    """Raise :class:`ParamsError` unless every entry of ``target_modules`` matches a module of ``module_names``
    the way PEFT matches a list: the full name equals the entry or ends with ``"." + entry`` (``q_proj``,
    ``self_attn.q_proj``, ``model.layers.0.self_attn.q_proj``). The message names the unmatched entries and the
    available (leaf) module names."""
    names = tuple(module_names)
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
        raise ParamsError(f"{key}: {', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} no "
                          f"module of {model}; its adaptable modules are {', '.join(leaves)} (a name, or a dotted "
                          "suffix of the full module path such as self_attn.q_proj)")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """Coerce ``value`` to ``tp`` (strictly) and enforce the field's range/choices."""
    if tp == SourceValue:
        return _check_source_value(key, value)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key}: expected a mapping (section {tp.__name__}), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        item_meta = {"choices": meta.get("choices")}
        return tuple(_check_value(f"{key}[{i}]", v, item_tp, item_meta) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamsError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"{key}: {value!r} is not allowed; expected a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
    else:  # pragma: no cover - guarded by the dataclass definitions above
        raise TypeError(f"unsupported field type {tp!r} for {key}")
    choices = meta.get("choices")
    if isinstance(choices, (Names, Registry)) and value not in choices:
        raise ParamsError(f"{key}: {unknown_message(choices.kind, value, choices.names())}")
    if isinstance(choices, tuple) and value not in choices:
        raise ParamsError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    rng = meta.get("range")
    if rng:
        lo, hi = rng
        too_high = hi is not None and (value >= hi if meta.get("open_hi") else value > hi)
        if (lo is not None and value < lo) or too_high:
            bracket = ")" if meta.get("open_hi") else "]"
            raise ParamsError(f"{key}: {value!r} is out of range; allowed [{lo}, {'inf' if hi is None else hi}{bracket}")
    return value


def _check_source_value(key: str, value: Any) -> str | dict[str, str]:
    """A data source is a non-empty string or a non-empty mapping of split name to the path of a file."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and value:
        for split, file in value.items():
            if not isinstance(split, str) or not split:
                raise ParamsError(f"{key}: a split name must be a string, got {split!r}")
            if not isinstance(file, str) or not file:
                raise ParamsError(f"{key}.{split}: expected the path of a data file, got {file!r}")
        return dict(value)
    raise ParamsError(f"{key}: expected 'synthetic', a hub id, a local path or a mapping of split name to file "
                      f"(e.g. {{train: train.jsonl, test: test.jsonl}}), got {value!r}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown key {where}{unknown[0]!s}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys{' in ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            default = fields[name].default_factory()  # type: ignore[misc]
            merged = _deep_merge(to_dict(default), value) if isinstance(value, Mapping) else value
            kwargs[name] = _check_value(key, merged, tp, fields[name].metadata)
        else:
            kwargs[name] = _check_value(key, value, tp, fields[name].metadata)
    return cls(**kwargs)


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list form of a params dataclass (tuples become lists), for manifests and YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _yaml_error(path: Path, err: yaml.YAMLError) -> ParamsError:
    """One line naming the file, the line and column, and what YAML found there."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) or str(err)
    return ParamsError(f"{where}: invalid YAML: {' '.join(what.split())}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of one params file with its ``extends:`` chain merged in (the child wins). ``extends:`` is
    relative to the directory of the file that contains it (or absolute)."""
    path = path.resolve()
    if path in seen:
        raise ParamsError(f"extends: cycle through {path}")
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read it as a YAML text file ({err})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping")
    parent = raw.pop("extends", None)
    raw = _resolve_paths(raw, path.parent, f"relative to {path.parent}, the folder of {path.name}, which declares it")
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise ParamsError(f"{path}: extends: expected the path of a params file, got {parent!r}")
    parent_path = Path(parent).expanduser()
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not parent_path.is_file():
        raise ParamsError(f"{path}: extends: {parent}: params file not found: {parent_path.resolve()} "
                          "(extends: is relative to the file that contains it)")
    try:
        inherited = _read_yaml(parent_path, seen + (path,))
    except ParamsError as err:
        raise ParamsError(f"{err} (extended by {path})") from None
    return _deep_merge(inherited, raw)


CWD_ORIGIN = "no params file declares it, so relative to the current directory"


MODEL_PATH_KEYS = (("model", "name"), ("judges", "moderation", "model"))
"""Params fields that name a model: a hub id, ``tiny``, or a local folder (:func:`_resolve_model_paths`)."""


def _resolve_paths(raw: dict[str, Any], base: Path, origin: str) -> dict[str, Any]:
    """``raw`` with its data sources', models' and evaluation folders' local paths made absolute against ``base``."""
    return _resolve_folders(_resolve_model_paths(_resolve_sources(raw, base, origin), base, origin), base)


FOLDER_KEYS = ("data_dir", "capability_dir")
"""``evaluation`` fields naming a local folder: made absolute against the declaring params file's folder where they
are relative (``./x``, ``../x``); checked when read (the suite names a missing benchmark file and its origin)."""


def _resolve_folders(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    evaluation = raw.get("evaluation")
    if not isinstance(evaluation, Mapping):
        return raw
    resolved = {k: str((base / v).resolve()) if k in FOLDER_KEYS and isinstance(v, str) and v.startswith(("./", "../"))
                else v for k, v in evaluation.items()}
    return {**raw, "evaluation": resolved}


def _resolve_model_paths(raw: dict[str, Any], base: Path, origin: str) -> dict[str, Any]:
    """``raw`` with ``model.name`` and ``judges.moderation.model`` made absolute where they are relative paths
    (``./x``, ``../x``), against ``base`` (the folder of the params file that declares them), like data sources;
    a relative path that does not exist there is a :class:`ParamsError` naming where it was looked for (unless a
    file that extends this one re-points it: :class:`_MissingPath`). Hub ids, ``tiny`` and absolute paths are kept
    as written (an absolute path is checked when the model is loaded)."""
    for keys in MODEL_PATH_KEYS:
        parents, node = [], raw
        for k in keys[:-1]:
            parents.append(node)
            node = node.get(k) if isinstance(node, Mapping) else None
        value = node.get(keys[-1]) if isinstance(node, Mapping) else None
        if not isinstance(value, str) or not value.startswith(("./", "../")):
            continue
        resolved = _resolve_path(".".join(keys), value, base, origin, hub=False, what="local model folder")
        node = {**node, keys[-1]: resolved}
        for parent, k in zip(reversed(parents), reversed(keys[:-1])):
            node = {**parent, k: node}
        raw = node
    return raw


def _resolve_sources(raw: dict[str, Any], base: Path, origin: str) -> dict[str, Any]:
    """``raw`` with the local paths among its ``data.sources`` values made absolute (relative ones against
    ``base``): see :class:`SourcesConfig` for the rule. ``origin`` says, in errors, where ``base`` comes from."""
    data = raw.get("data")
    sources = data.get("sources") if isinstance(data, Mapping) else None
    if not isinstance(sources, Mapping):
        return raw
    resolved = {name: _resolve_source(f"data.sources.{name}", value, base, origin) for name, value in sources.items()}
    return {**raw, "data": {**data, "sources": resolved}}


def _resolve_source(key: str, value: Any, base: Path, origin: str) -> Any:
    if isinstance(value, Mapping):
        return {split: _resolve_path(f"{key}.{split}", v, base, origin, hub=False) for split, v in value.items()}
    return _resolve_path(key, value, base, origin, hub=True)


def _resolve_path(key: str, value: Any, base: Path, origin: str, hub: bool, what: str = "") -> Any:
    """An existing path -> its absolute form; a hub id (``hub``: not inside a split mapping) or ``synthetic`` ->
    unchanged; a path-like value that does not exist -> a :class:`_MissingPath` whose error (raised if no file
    down the ``extends:`` chain re-points it) names the path as written and as resolved (and, for a stand-in
    asset, the command that builds it: :func:`nlsr_lib.standin.asset_hint`)."""
    from .data.loaders import SYNTHETIC, looks_local

    if not isinstance(value, str) or not value or (hub and value == SYNTHETIC):
        return value  # a wrong type is named by the type check
    path = Path(value).expanduser()
    full = (path if path.is_absolute() else base / path).resolve()
    if full.exists():
        return str(full)
    if hub and not looks_local(value):
        return value
    from .standin import asset_hint

    notes = [n for n, on in (("a split of a mapping names a local file", not hub and not what),
                             (origin, not path.is_absolute())) if on]
    hint = asset_hint(full)
    return _MissingPath(full, f"{key}: {what or 'local path'} {value!r} does not exist: looked for {full}"
                        + (f" ({'; '.join(notes)})" if notes else "") + (f"; {hint}" if hint else ""))


class _MissingPath(str):
    """A local path (absolute) that does not exist, with the error naming it as written and where it was looked
    for. A file's paths are resolved when it is read, but a file that ``extends:`` it may re-point them, so the
    error is raised only if the path is still there once the chain is merged (:func:`_raise_missing_paths`)."""

    def __new__(cls, path: Path, error: str) -> "_MissingPath":
        obj = super().__new__(cls, str(path))
        obj.error = error
        return obj


def _raise_missing_paths(raw: Mapping[str, Any]) -> None:
    """Raise the :class:`ParamsError` of the first local path of the merged params that does not exist."""
    data = raw.get("data")
    sources = data.get("sources") if isinstance(data, Mapping) else None
    values: list[Any] = []
    for value in (sources.values() if isinstance(sources, Mapping) else ()):
        values += list(value.values()) if isinstance(value, Mapping) else [value]
    for keys in MODEL_PATH_KEYS:
        node: Any = raw
        for k in keys:
            node = node.get(k) if isinstance(node, Mapping) else None
        values.append(node)
    for value in values:
        if isinstance(value, _MissingPath):
            raise ParamsError(value.error)


def _resolve_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted overrides whose data sources are resolved against the current directory (where a command is typed)."""
    out = {}
    for dotted, value in overrides.items():
        node: Any = _resolve_paths(_apply_overrides({}, {dotted: value}), Path.cwd(), CWD_ORIGIN)
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted-key overrides (``{"alignment.dpo.learning_rate": 1e-5}``) on top of the file's mapping."""
    out = dict(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def resolve_params_path(path: str | Path) -> Path:
    """Where a params file is — one rule for notebooks, papermill, ``nlsr reproduce`` and Python:

    * an absolute path (``~`` expanded) is used as it is;
    * a relative path is relative to the **repository root** (:data:`nlsr_lib.paths.PROJECT_ROOT`), whatever the
      current directory: ``params/smoke.yaml`` means the same file in a notebook's kernel (which runs in
      ``notebooks/``), under ``papermill`` started from the root and in a test;
    * ``extends:`` inside a params file is relative to the file that contains it (see :func:`_read_yaml`).

    The ``nlsr`` command line differs in one way, as every command-line tool does: a path typed on it is first
    looked up relative to the shell's current directory (``nlsr_lib.cli.cli_path``), then by this rule.
    The result may not exist; :func:`load_params` then names every place it looked.
    """
    from .paths import PROJECT_ROOT

    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return PROJECT_ROOT / p


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Load a params YAML (with ``extends:``), apply dotted overrides, validate and freeze it. Relative data-source
    paths are made absolute against the folder of the file that declares them (overrides: the current directory),
    and local data files are checked (:class:`SourcesConfig`)."""
    resolved = resolve_params_path(path)
    if not resolved.is_file():
        from .paths import PROJECT_ROOT

        raise ParamsError(f"params file not found: {path} (looked for {resolved}; a relative path is relative to "
                          f"the repository root {PROJECT_ROOT})")
    raw = _apply_overrides(_read_yaml(resolved), _resolve_overrides(overrides or {}))
    _raise_missing_paths(raw)
    params = _build(Params, raw)
    for check in _CROSS_CHECKS:
        check(params)
    return params


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Validate an already-merged mapping (used by tests and by manifests); relative data-source paths are
    relative to the current directory (there is no params file to be relative to)."""
    raw = _resolve_paths(dict(raw), Path.cwd(), CWD_ORIGIN)
    _raise_missing_paths(raw)
    params = _build(Params, raw)
    for check in _CROSS_CHECKS:
        check(params)
    return params


def dump_params(params: Params) -> str:
    return yaml.safe_dump(to_dict(params), sort_keys=False)


__all__ = [
    "ParamsError", "Params", "load_params", "params_from_dict", "dump_params", "to_dict",
    "SEVEN_PROJECTIONS", "PREFERENCE_METHODS", "TrainConfig", "resolve_params_path", "model_module_names",
    "check_target_modules",
]
