"""Token-wise constrained fine-tuning (Qi et al., "shallow vs deep alignment"): spec/defences.md §5.

The user's fine-tuning loss is replaced by a per-token DPO-like objective against the aligned model (π_ref, the
adapter at the start of fine-tuning). For response token t (t = 0 the first response token),
``Δ_t = log π_θ(y_t) − log π_ref(y_t)`` and

    paper objective   L = Σ_t −(2/β_t)·log σ(β_t·Δ_t)
    code loss         −(1/N)·Σ_tokens sg[max(w_t, min_weight)]·log π_θ(y_t),   w_t = 2·(1 − σ(β_t·Δ_t))

which have the same gradient (up to the floor). β_t = β·first_token_bias_factor at t = 0, β·bias_factor for
1 ≤ t < bias_length and β after. The reference log-probs are precomputed once before training with the initial model
(dropout off, no grad), keyed by example index (D-C1, D-C3); ``reference="online"`` recomputes them each step with the
initial adapter weights swapped in. :class:`ConstrainedSFTTrainer` is the attack-stage trainer (a trl ``SFTTrainer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

import torch
import torch.nn.functional as F

from .alignment import _sft_trainer

REFERENCES = ("precompute", "online")
REDUCTIONS = ("micro_batch", "accumulated")
EXAMPLE_ID = "example_id"

DEFAULTS = {"beta": 0.1, "bias_factor": 20.0, "first_token_bias_factor": 5.0, "bias_length": 5, "min_weight": 1e-3,
            "reference": "precompute", "reduction": "micro_batch"}


# --------------------------------------------------------------------------------------------- the objective
def check_hyperparameters(beta: float = 0.1, bias_factor: float = 20.0, first_token_bias_factor: float = 5.0,
                          bias_length: int = 5, min_weight: float = 1e-3, reference: str = "precompute",
                          reduction: str = "micro_batch") -> None:
    """``ValueError`` naming the first hyperparameter outside its allowed range (spec/defences.md §5)."""
    for name, value in (("beta", beta), ("bias_factor", bias_factor),
                        ("first_token_bias_factor", first_token_bias_factor)):
        if not value > 0:
            raise ValueError(f"constrained SFT: {name} = {value!r}; allowed: a number > 0")
    if isinstance(bias_length, bool) or not isinstance(bias_length, int) or bias_length < 1:
        raise ValueError(f"constrained SFT: bias_length = {bias_length!r}; allowed: an integer >= 1")
    if not 0 <= min_weight < 2:
        raise ValueError(f"constrained SFT: min_weight = {min_weight!r}; allowed: 0 <= min_weight < 2 "
                         "(0 gives the paper's gradient, 1e-3 the code's floor; weights never exceed 2)")
    if reference not in REFERENCES:
        raise ValueError(f"constrained SFT: reference = {reference!r}; allowed: {', '.join(REFERENCES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"constrained SFT: reduction = {reduction!r}; allowed: {', '.join(REDUCTIONS)}")


def betas_at(positions: torch.Tensor, beta: float = 0.1, bias_factor: float = 20.0,
             first_token_bias_factor: float = 5.0, bias_length: int = 5) -> torch.Tensor:
    """β_t at response-token positions ``t`` (from 0): β·first_token_bias_factor at 0, β·bias_factor for
    1 ≤ t < bias_length, β after (spec/defences.md §5)."""
    out = torch.full(positions.shape, float(beta), dtype=torch.float32, device=positions.device)
    out = torch.where(positions < bias_length, out * bias_factor, out)
    return torch.where(positions == 0, torch.full_like(out, beta * first_token_bias_factor), out)


def beta_schedule(length: int, beta: float = 0.1, bias_factor: float = 20.0, first_token_bias_factor: float = 5.0,
                  bias_length: int = 5) -> torch.Tensor:
    """[β_0, …, β_{length−1}] for a response of ``length`` tokens (spec/defences.md §5, test C1)."""
    if length < 0:
        raise ValueError(f"beta_schedule: length = {length}; allowed: an integer >= 0")
    return betas_at(torch.arange(length), beta, bias_factor, first_token_bias_factor, bias_length)


def token_weights(logp: torch.Tensor, ref_logp: torch.Tensor, betas: torch.Tensor,
                  min_weight: float = 1e-3) -> torch.Tensor:
    """w_t = sg[max(2·(1 − σ(β_t·Δ_t)), min_weight)], Δ_t = logp − ref_logp, in fp32 (spec/defences.md §5, C2, C3).
    Computed as 2·σ(−β_t·Δ_t), the same number without cancellation."""
    delta = logp.detach().float() - ref_logp.detach().float()
    return (2 * torch.sigmoid(-betas.float() * delta)).clamp(min=min_weight)


def constrained_loss(logp: torch.Tensor, ref_logp: torch.Tensor, betas: torch.Tensor, mask: torch.Tensor,
                     min_weight: float = 1e-3, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """−(1/N)·Σ_{mask} w_t·log π_θ(y_t): the token mean over every response token of the micro-batch, N =
    ``mask.sum()`` unless ``num_items`` is given (spec/defences.md §5, D-C4; C2, C5). ``mask`` is 1 on response
    tokens; positions outside it count for nothing whatever their values."""
    mask = mask.bool()
    weights = token_weights(logp, ref_logp, betas, min_weight)
    per_token = torch.where(mask, -weights * logp.float(), torch.zeros((), device=logp.device))
    count = mask.sum() if num_items is None else num_items
    return per_token.sum() / torch.as_tensor(count, device=logp.device).clamp(min=1)


def paper_objective(logp: torch.Tensor, ref_logp: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Per-token paper objective −(2/β_t)·log σ(β_t·Δ_t) (spec/defences.md §5; C2, C4). Differentiable in both
    log-prob arguments; its derivative in ``logp`` is −2·(1 − σ(β_t·Δ_t)) = −w_t without the floor."""
    betas = betas.to(logp.dtype)
    return -(2 / betas) * F.logsigmoid(betas * (logp - ref_logp))


# --------------------------------------------------------------------------------------------- log-probs
def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each response token within its own sequence, from 0, counting response tokens only (D-C1); 0 where
    ``mask`` is 0. ``mask``: (batch, positions), 1 on response tokens."""
    mask = mask.long()
    return (mask.cumsum(dim=-1) - 1).clamp(min=0) * mask


def label_logps(model, batch: Mapping[str, torch.Tensor], fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y_t), mask)`` of every next-token label, both (batch, seq_len − 1): labels shifted by one, −100
    excluded (mask 0, log-prob 0). ``fused``: the model carries trl's fused LM head (the one ``SFTTrainer`` adds),
    which scores the labelled positions without building the logits; otherwise the logits are used."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    labels = batch["labels"]
    if fused:
        out = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
        return out.log_probs, out.label_mask
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros((), device=logp.device)), mask


@torch.no_grad()
def precompute_reference_logps(model, dataset, collator, batch_size: int = 8, fused: bool = False,
                               id_column: str = EXAMPLE_ID) -> dict[int, torch.Tensor]:
    """log π_ref(y_t) of every response token of every example of ``dataset`` (rows with ``input_ids``, ``labels``
    (prompt −100) and ``id_column``), with ``model`` as it is now: no grad, eval mode (dropout off), in dataset
    order; the model's train/eval mode is restored after. Returns {example index: 1-D fp32 CPU tensor, one entry per
    response token in order} (spec/defences.md §5 "before training", D-C1, D-C3)."""
    if id_column not in dataset.column_names:
        raise ValueError(f"precompute_reference_logps: the dataset has no {id_column!r} column (its columns: "
                         f"{', '.join(dataset.column_names)}); number the examples first")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cache: dict[int, torch.Tensor] = {}
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
            logp, mask = label_logps(model, {k: v.to(device) for k, v in batch.items()}, fused)
            for row, values, keep in zip(rows, logp.float().cpu(), mask.cpu()):
                key = int(row[id_column])
                if key in cache:
                    raise ValueError(f"precompute_reference_logps: example index {key} appears twice; allowed: "
                                     "unique indices")
                cache[key] = values[keep].clone()
    finally:
        model.train(was_training)
    return cache


def gather_reference(cache: Mapping[int, torch.Tensor], ids: Iterable[int], mask: torch.Tensor) -> torch.Tensor:
    """The cached reference log-probs laid out like ``mask`` (batch, positions): row i's response tokens, in order,
    get ``cache[ids[i]]``; 0 elsewhere. ``ValueError`` when an index is missing or its token count differs."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for row, key in enumerate(int(i) for i in ids):
        if key not in cache:
            raise KeyError(f"constrained SFT: no reference log-probs for example {key}; the cache holds "
                           f"{len(cache)} examples (precompute them on the training set)")
        values, keep = cache[key], mask[row].bool()
        if values.numel() != int(keep.sum()):
            raise ValueError(f"constrained SFT: example {key} has {int(keep.sum())} response tokens in the batch but "
                             f"{values.numel()} cached reference log-probs; the cache must come from the same "
                             "tokenized training set")
        out[row, keep] = values.to(device=out.device, dtype=out.dtype)
    return out


# --------------------------------------------------------------------------------------------- trainer
def with_example_ids(dataset, id_column: str = EXAMPLE_ID):
    """``dataset`` (a ``datasets.Dataset``) with an ``id_column`` holding each row's index, unless it has one."""
    if id_column in dataset.column_names:
        return dataset
    return dataset.add_column(id_column, list(range(len(dataset))))


class _ExampleIdCollator:
    """Wraps a collator: the batch also carries the examples' indices as a long tensor ``example_id``."""

    def __init__(self, inner, id_column: str = EXAMPLE_ID):
        self.inner, self.id_column = inner, id_column

    def __call__(self, examples):
        batch = self.inner([{k: v for k, v in e.items() if k != self.id_column} for e in examples])
        if all(self.id_column in e for e in examples):
            batch[self.id_column] = torch.tensor([int(e[self.id_column]) for e in examples], dtype=torch.long)
        return batch


def _build_trainer_class():
    """The trainer class, built on first use so that importing this module does not import trl."""
    from trl import SFTTrainer

    class ConstrainedSFTTrainer(SFTTrainer):
        """trl ``SFTTrainer`` whose training loss is the token-wise constrained loss (spec/defences.md §5).

        Same arguments as ``SFTTrainer`` (``train_dataset`` a ``datasets.Dataset`` of prompt-completion rows, by
        keyword), plus the hyperparameters: ``beta`` 0.1, ``bias_factor`` 20, ``first_token_bias_factor`` 5,
        ``bias_length`` 5, ``min_weight`` 1e-3 (D-C2), ``reference`` "precompute" | "online" (D-C3), ``reduction``
        "micro_batch" (D-C4: token mean per micro-batch) | "accumulated" (token mean over the accumulated batch, as the
        project's plain SFT). ``reference_logps`` reuses a cache of :func:`precompute_reference_logps`. The reference
        is the model as given when the trainer is built (the aligned adapter, or with ``peft_config`` a fresh LoRA:
        the merged aligned model). Evaluation batches (no example index) get the plain SFT loss."""

        def __init__(self, model, args=None, *, train_dataset=None, beta: float = 0.1, bias_factor: float = 20.0,
                     first_token_bias_factor: float = 5.0, bias_length: int = 5, min_weight: float = 1e-3,
                     reference: str = "precompute", reduction: str = "micro_batch",
                     reference_logps: Mapping[int, torch.Tensor] | None = None, **kwargs):
            check_hyperparameters(beta, bias_factor, first_token_bias_factor, bias_length, min_weight, reference,
                                  reduction)
            if not hasattr(train_dataset, "add_column"):
                raise ValueError("ConstrainedSFTTrainer: train_dataset must be a datasets.Dataset (the reference "
                                 f"log-probs are keyed by row index), not {type(train_dataset).__name__}")
            self.hyper = {"beta": beta, "bias_factor": bias_factor,
                          "first_token_bias_factor": first_token_bias_factor, "bias_length": bias_length}
            self.min_weight, self.reference, self.reduction = min_weight, reference, reduction
            super().__init__(model, args, train_dataset=with_example_ids(train_dataset), **kwargs)
            if self.padding_free or self.args.packing:
                raise ValueError("ConstrainedSFTTrainer: padding_free and packing are not supported (the loss needs "
                                 "each sequence's own response-token positions); set both to False")
            if self.args.truncation_mode != "keep_start":
                raise ValueError(f"ConstrainedSFTTrainer: truncation_mode = {self.args.truncation_mode!r}; allowed: "
                                 "keep_start (positions count response tokens from the first one, D-C1)")
            if len(self.train_dataset) == 0:
                raise ValueError("ConstrainedSFTTrainer: no training example keeps a response token after truncation "
                                 f"to max_length = {self.args.max_length}; raise max_length or cut the prompts")
            self.loss_is_scaled_for_ga = reduction == "accumulated"
            self.data_collator = _ExampleIdCollator(self.data_collator)
            self.reference_passes = 0
            self._weight_log: list[tuple[float, float]] = []  # (mean, min) token weight per training micro-batch
            self.reference_logps = None if reference == "online" else reference_logps
            if reference == "precompute" and reference_logps is None:
                self.reference_logps = precompute_reference_logps(
                    self.model, self.train_dataset, self.data_collator.inner, self.args.per_device_train_batch_size,
                    fused=True)
                self.reference_passes = 1
            self._reference_weights = None
            if reference == "online":
                self._reference_weights = [p.detach().clone() for p in _trainable(self.model)]

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if EXAMPLE_ID not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, EXAMPLE_ID]

        @torch.no_grad()
        def _online_reference(self, model, inputs) -> torch.Tensor:
            """log π_ref per label with the initial trainable weights swapped in, eval mode (D-C3 online)."""
            model = self.accelerator.unwrap_model(model)
            params = _trainable(model)
            current = [p.detach().clone() for p in params]
            was_training = model.training
            try:
                for p, ref in zip(params, self._reference_weights):
                    p.copy_(ref)
                model.eval()
                logp, _ = label_logps(model, inputs, fused=True)
            finally:
                for p, cur in zip(params, current):
                    p.copy_(cur)
                model.train(was_training)
            return logp.float()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """−token-mean of w_t·log π_θ(y_t), w_t from the reference log-probs (spec/defences.md §5 "one step")."""
            if EXAMPLE_ID not in inputs:
                if model.training:
                    raise ValueError(f"ConstrainedSFTTrainer: a training batch without {EXAMPLE_ID!r}; the reference "
                                     "log-probs are keyed by it (keep the column: do not replace the data collator)")
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            ids = inputs.pop(EXAMPLE_ID)
            online = self._online_reference(model, inputs) if self.reference == "online" else None
            logp, mask = label_logps(model, inputs, fused=True)
            ref = online if online is not None else gather_reference(self.reference_logps, ids.tolist(), mask)
            betas = betas_at(response_positions(mask), **self.hyper)
            count = self._token_count(mask, num_items_in_batch)
            loss = constrained_loss(logp, ref, betas, mask, self.min_weight, count)
            if self.reduction == "accumulated" and num_items_in_batch is not None \
                    and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
            if mask.any():
                weights = token_weights(logp, ref, betas, self.min_weight)[mask]
                self._metrics["train" if model.training else "eval"]["mean_token_weight"].append(
                    weights.mean().item())
                if model.training:
                    self._weight_log.append((weights.mean().item(), weights.min().item()))
            return (loss, None) if return_outputs else loss

        def defence_record(self) -> dict:
            """What the run did, for its manifest: the hyperparameters, the reference passes and the token weights
            w_t over training (mean of the micro-batch means, the smallest weight seen); weights near 1 mean the
            objective trained as plain SFT."""
            log = self._weight_log
            return {"defence": "constrained_sft", **self.hyper, "min_weight": self.min_weight,
                    "reference": self.reference, "reduction": self.reduction,
                    "reference_passes": self.reference_passes, "micro_batches": len(log),
                    "mean_token_weight": sum(m for m, _ in log) / len(log) if log else None,
                    "min_token_weight": min(w for _, w in log) if log else None}

        def _token_count(self, mask, num_items_in_batch):
            """N of the token mean: this micro-batch's tokens (D-C4), or the accumulated batch's."""
            if self.reduction == "micro_batch":
                return None
            if num_items_in_batch is not None:
                return num_items_in_batch
            return mask.sum() * self.current_gradient_accumulation_steps

    return ConstrainedSFTTrainer


def _trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    """``ConstrainedSFTTrainer`` is built (and trl imported) on first access."""
    if name == "ConstrainedSFTTrainer":
        if name not in _CLASSES:
            _CLASSES[name] = _build_trainer_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trainer_factory(**hyperparameters):
    """``(trainer class, config class, config kwargs)`` in the form of
    :attr:`~nlsr_lib.train.alignment.AlignmentMethod.trainer`: ``ConstrainedSFTTrainer`` with ``hyperparameters``
    bound, trl's ``SFTConfig`` and the SFT config kwargs (``max_length``, ``completion_only_loss``). Unknown or out of
    range hyperparameters are refused here."""
    unknown = sorted(set(hyperparameters) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"constrained SFT: unknown hyperparameter(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(DEFAULTS)}")
    check_hyperparameters(**{**DEFAULTS, **hyperparameters})
    _, config_cls, config_kwargs = _sft_trainer()
    return partial(__getattr__("ConstrainedSFTTrainer"), **hyperparameters), config_cls, config_kwargs
