"""Lisa: lazy safety alignment by bi-state optimisation during the user's fine-tuning (spec/defences.md §3).

Rounds of K_a steps on the provider's alignment ("guide") data, then K_f steps on the user's data, with a proximal
term that keeps each state near the point where the other state last stopped:

    alignment state:  f(θ) + (ρ/2)·‖θ − θ̂_F‖²     user state:  u(θ) + (ρ/2)·‖θ − θ̂_A‖²

θ̂_A / θ̂_F = θ at the last switch out of the alignment / user state (both θ_0 at first), θ = the LoRA factors
(D-L4, anchors in fp32). :class:`LisaState` is the schedule and the anchors, switching at optimizer-step boundaries
(D-L1); :func:`lisa_sgd` runs it with plain SGD (the L3 toy trajectory); :class:`LisaTrainer` is the attack-stage
trainer (a trl ``SFTTrainer``, one optimizer for both states, D-L5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .alignment import _sft_trainer

ALIGN = "A"  # the alignment state (guide data, objective f)
USER = "F"  # the user fine-tuning state (user data, objective u)
USER_BATCHES = ("discard",)

DEFAULTS = {"k_align": 100, "k_user": 900, "rho": 1.0, "prox_warmup_frac": 0.1, "user_batches": "discard"}


# --------------------------------------------------------------------------------------------- checks
def check_hyperparameters(k_align: int = 100, k_user: int = 900, rho: float = 1.0, prox_warmup_frac: float = 0.1,
                          user_batches: str = "discard") -> None:
    """``ValueError`` naming the first hyperparameter outside its allowed range (spec/defences.md §3)."""
    for name, value in (("k_align", k_align), ("k_user", k_user)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Lisa: {name} = {value!r}; allowed: an integer >= 0")
    if k_align + k_user == 0:
        raise ValueError("Lisa: k_align + k_user = 0; allowed: at least one step per round (k_align >= 1 or "
                         "k_user >= 1)")
    _check_rho(rho)
    if not (isinstance(prox_warmup_frac, (int, float)) and 0 <= prox_warmup_frac < 1):
        raise ValueError(f"Lisa: prox_warmup_frac = {prox_warmup_frac!r}; allowed: 0 <= prox_warmup_frac < 1")
    if user_batches not in USER_BATCHES:
        raise ValueError(f"Lisa: user_batches = {user_batches!r}; allowed: {', '.join(USER_BATCHES)} (D-L2; 'hold' "
                         "is not implemented)")


def _check_rho(rho: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"Lisa: rho = {rho!r}; allowed: a finite number >= 0")


# --------------------------------------------------------------------------------------------- the pieces
def anchor_copy(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A detached copy of ``params`` in at least fp32 (half precision is upcast; D-L4)."""
    return [p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for p in params]


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rho: float) -> torch.Tensor:
    """(ρ/2)·Σ_tensors ‖θ − anchor‖², computed in at least fp32 (spec/defences.md §3, L2); its gradient is
    ρ·(θ − anchor)."""
    _check_rho(rho)
    params, anchor = list(params), list(anchor)
    if len(params) != len(anchor):
        raise ValueError(f"proximal_term: {len(params)} parameter tensors but {len(anchor)} anchor tensors; allowed: "
                         "one anchor per parameter")
    if not params:
        raise ValueError("proximal_term: no parameters; allowed: at least one trainable tensor")
    total = None
    for i, (p, a) in enumerate(zip(params, anchor)):
        if p.shape != a.shape:
            raise ValueError(f"proximal_term: tensor {i} has shape {tuple(p.shape)}, its anchor {tuple(a.shape)}")
        dtype = torch.promote_types(torch.promote_types(p.dtype, torch.float32), a.dtype)
        term = (p.to(dtype) - a.to(device=p.device, dtype=dtype)).pow(2).sum()
        total = term if total is None else total + term.to(total.dtype)
    return rho / 2 * total


def prox_active(step: int, total_steps: int, prox_warmup_frac: float) -> bool:
    """Whether step ``step`` (0-based, = completed optimizer steps) has the proximal term: ``step >
    prox_warmup_frac · total_steps``, strict (D-L3, L4)."""
    return step > prox_warmup_frac * total_steps


@dataclass
class LisaState:
    """Lisa's state machine (spec/defences.md §3 "one training step", code semantics, in optimizer steps D-L1).

    Starts in ALIGN when ``k_align`` > 0 (else USER); :meth:`begin_step` is called at the start of every step
    ``k`` (calls with the same ``k`` — the other micro-batches of one optimizer step — change nothing). At step
    k ≠ 0, after ``k_align`` steps in ALIGN it copies θ to θ̂_A and switches to USER; after ``k_user`` steps in
    USER it copies θ to θ̂_F and switches to ALIGN. A state with 0 steps is never entered. Anchors are fp32."""

    k_align: int = 100
    k_user: int = 900
    phase: str = field(init=False)
    clock: int = 0  # completed steps in the current state
    step: int = -1  # the step last begun
    anchor_align: list[torch.Tensor] | None = None  # θ̂_A
    anchor_user: list[torch.Tensor] | None = None  # θ̂_F

    def __post_init__(self):
        check_hyperparameters(self.k_align, self.k_user)
        self.phase = ALIGN if self.k_align > 0 else USER

    def begin_step(self, k: int, params: Sequence[torch.Tensor] | None = None) -> str:
        """Enter step ``k`` (0, 1, 2, … in order) and return its state; ``params`` (θ now) feed the anchors."""
        if k == self.step:
            return self.phase
        if k != self.step + 1:
            raise ValueError(f"LisaState: step {k} after step {self.step}; allowed: the same step or the next one")
        if k == 0 and params is not None:
            theta0 = anchor_copy(params)
            self.anchor_align = self.anchor_user = theta0
        if k > 0:
            self.clock += 1
            if self.phase == ALIGN and self.k_user > 0 and self.clock == self.k_align:
                self._switch(USER, params)
            elif self.phase == USER and self.k_align > 0 and self.clock == self.k_user:
                self._switch(ALIGN, params)
        self.step = k
        return self.phase

    def _switch(self, to: str, params) -> None:
        snapshot = None if params is None else anchor_copy(params)
        if self.phase == ALIGN:
            self.anchor_align = snapshot
        else:
            self.anchor_user = snapshot
        self.phase, self.clock = to, 0

    @property
    def anchor(self) -> list[torch.Tensor] | None:
        """The proximal anchor of the current state: θ̂_F in ALIGN, θ̂_A in USER."""
        return self.anchor_user if self.phase == ALIGN else self.anchor_align


def lisa_schedule(total_steps: int, k_align: int = 100, k_user: int = 900) -> list[str]:
    """The state (:data:`ALIGN` "A" / :data:`USER` "F") of each of ``total_steps`` steps (spec/defences.md §3, L1)."""
    state = LisaState(k_align, k_user)
    return [state.begin_step(k) for k in range(total_steps)]


@dataclass(frozen=True)
class LisaSGDStep:
    """One row of the toy trajectory: state, θ before, gradient (objective + proximal), θ after, anchor."""

    phase: str
    theta: torch.Tensor
    grad: torch.Tensor
    theta_after: torch.Tensor
    anchor: torch.Tensor


def lisa_sgd(theta0, align_loss: Callable[[torch.Tensor], torch.Tensor],
             user_loss: Callable[[torch.Tensor], torch.Tensor], steps: int, lr: float, k_align: int = 100,
             k_user: int = 900, rho: float = 1.0, prox_warmup_frac: float = 0.1) -> list[LisaSGDStep]:
    """Lisa with plain SGD θ ← θ − lr·∇(loss + proximal) on one tensor θ (float64), through the same
    :class:`LisaState` and :func:`proximal_term` as :class:`LisaTrainer` (the reference of test L3)."""
    check_hyperparameters(k_align, k_user, rho, prox_warmup_frac)
    theta = torch.as_tensor(theta0, dtype=torch.float64).clone()
    state, rows = LisaState(k_align, k_user), []
    for k in range(steps):
        phase = state.begin_step(k, [theta])
        anchor = state.anchor
        current = theta.clone().requires_grad_(True)
        loss = (align_loss if phase == ALIGN else user_loss)(current)
        if prox_active(k, steps, prox_warmup_frac):
            loss = loss + proximal_term([current], anchor, rho)
        (grad,) = torch.autograd.grad(loss, current)
        after = theta - lr * grad
        rows.append(LisaSGDStep(phase, theta, grad, after, anchor[0]))
        theta = after
    return rows


# --------------------------------------------------------------------------------------------- trainer
def _build_trainer_class():
    """The trainer class, built on first use so that importing this module does not import trl."""
    from trl import SFTTrainer

    class LisaTrainer(SFTTrainer):
        """trl ``SFTTrainer`` running Lisa's bi-state optimisation (spec/defences.md §3).

        Same arguments as ``SFTTrainer`` (the user's prompt-completion rows as ``train_dataset``) plus
        ``guide_dataset`` (the provider's alignment rows: a list of prompt/completion dicts or a ``datasets.Dataset``,
        tokenized like the user data) and the hyperparameters ``k_align`` 100, ``k_user`` 900 (optimizer steps per
        round, D-L1), ``rho`` 1, ``prox_warmup_frac`` 0.1 (D-L3), ``user_batches`` "discard" (D-L2). On an
        alignment step every micro-batch comes from the guide data (own loader, shuffled by the run's seed, cycled)
        and the user batch the trainer drew is discarded; one optimizer and LR schedule serve both states (D-L5).
        ``lisa_phases`` lists the state of every optimizer step run."""

        def __init__(self, model, args=None, *, guide_dataset=None, k_align: int = 100, k_user: int = 900,
                     rho: float = 1.0, prox_warmup_frac: float = 0.1, user_batches: str = "discard", **kwargs):
            check_hyperparameters(k_align, k_user, rho, prox_warmup_frac, user_batches)
            if k_align > 0 and (guide_dataset is None or len(guide_dataset) == 0):
                raise ValueError("Lisa: k_align > 0 needs guide data; pass guide_dataset (the provider's alignment "
                                 "rows) or set k_align = 0")
            super().__init__(model, args, **kwargs)
            if self.args.packing:
                raise ValueError("Lisa: packing is not supported (guide batches are padded like the user's); set "
                                 "packing=False")
            self.k_align, self.k_user, self.rho, self.prox_warmup_frac = k_align, k_user, rho, prox_warmup_frac
            self.user_batches = user_batches
            self.guide_dataset = None if k_align == 0 else self._prepare_guide(guide_dataset)
            self.lisa = LisaState(k_align, k_user)
            self.lisa_phases: list[str] = []
            self._guide_iter, self._guide_epoch, self._params = None, 0, None

        def _prepare_guide(self, guide):
            from datasets import Dataset

            from .alignment import fit_prompts

            if not isinstance(guide, Dataset):
                rows, _ = fit_prompts([dict(r) for r in guide], self.processing_class, self.args.max_length)
                guide = Dataset.from_list(rows)
            prepared = self._prepare_dataset(guide, self.processing_class, self.args, False, None, "guide")
            return prepared.select_columns(["input_ids", "labels"])

        def _next_guide_batch(self):
            """The next guide micro-batch: a shuffled pass over the guide data (seed = run seed + pass), cycled."""
            while True:
                if self._guide_iter is None:
                    gen = torch.Generator().manual_seed(self.args.seed + self._guide_epoch)
                    loader = torch.utils.data.DataLoader(
                        self.guide_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                        generator=gen, collate_fn=self.data_collator, num_workers=0)
                    self._guide_iter, self._guide_epoch = iter(loader), self._guide_epoch + 1
                try:
                    return next(self._guide_iter)
                except StopIteration:
                    self._guide_iter = None

        def _trainable(self) -> list[torch.Tensor]:
            if self._params is None:
                model = self.accelerator.unwrap_model(self.model)
                self._params = [p for p in model.parameters() if p.requires_grad]
            return self._params

        def training_step(self, model, inputs, num_items_in_batch=None):
            """Enter the optimizer step's state; on an alignment step train on a guide batch instead (D-L2)."""
            k = self.state.global_step
            if k != self.lisa.step:
                phase = self.lisa.begin_step(k, self._trainable())
                self.lisa_phases.append(phase)
            if self.lisa.phase == ALIGN:
                inputs, num_items_in_batch = self._next_guide_batch(), None  # per-micro-batch token mean
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The SFT loss of the state's batch plus (ρ/2)·‖θ − anchor‖² once the warm-up is over."""
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training or self.rho == 0 or not prox_active(self.lisa.step, self.state.max_steps,
                                                                       self.prox_warmup_frac):
                return result
            prox = proximal_term(self._trainable(), self.lisa.anchor, self.rho)
            if self._scaled_for_accumulation(num_items_in_batch):
                prox = prox / self.current_gradient_accumulation_steps  # once per optimizer step
            self._metrics["train"]["proximal"].append(prox.item())
            if return_outputs:
                loss, outputs = result
                return loss + prox.to(loss.dtype), outputs
            return result + prox.to(result.dtype)

        def _scaled_for_accumulation(self, num_items_in_batch) -> bool:
            """Whether ``Trainer.training_step`` leaves this loss undivided by the accumulation steps."""
            if self.loss_is_scaled_for_ga is not None:
                return bool(self.loss_is_scaled_for_ga)
            return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                        or self.compute_loss_func is not None)

        def defence_record(self) -> dict:
            """What the run did, for its manifest (D-L6: the guide rows are the provider's alignment data)."""
            return {"defence": "lisa", "k_align": self.k_align, "k_user": self.k_user, "rho": self.rho,
                    "prox_warmup_frac": self.prox_warmup_frac, "user_batches": self.user_batches,
                    "prox_threshold": self.prox_warmup_frac * self.state.max_steps,
                    "align_steps": self.lisa_phases.count(ALIGN), "user_steps": self.lisa_phases.count(USER),
                    "guide_examples": 0 if self.guide_dataset is None else len(self.guide_dataset)}

    return LisaTrainer


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    """``LisaTrainer`` is built (and trl imported) on first access."""
    if name == "LisaTrainer":
        if name not in _CLASSES:
            _CLASSES[name] = _build_trainer_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trainer_factory(guide_rows, **hyperparameters):
    """``(trainer class, config class, config kwargs)`` in the form of
    :attr:`~nlsr_lib.train.alignment.AlignmentMethod.trainer`: ``LisaTrainer`` with ``guide_rows`` (prompt/completion
    dicts) and ``hyperparameters`` bound, trl's ``SFTConfig`` and the SFT config kwargs. Unknown or out of range
    hyperparameters are refused here."""
    unknown = sorted(set(hyperparameters) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"Lisa: unknown hyperparameter(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}")
    check_hyperparameters(**{**DEFAULTS, **hyperparameters})
    _, config_cls, config_kwargs = _sft_trainer()
    return partial(__getattr__("LisaTrainer"), guide_dataset=guide_rows, **hyperparameters), config_cls, config_kwargs
