"""Booster: attenuating harmful perturbation during alignment (spec/defences.md §2).

    min_θ  f(θ) + λ · [h(θ) − h(θ̃)],   θ̃ = θ − α · ∇h(θ) / (‖∇h(θ)‖ + 1e-7)
    g = ∇f(θ) + λ · (∇h(θ) − ∇h(θ̃))          (first order: the normalised direction is a constant, D-B1)

f is the alignment loss on an alignment batch, h the loss on one harmful batch used by both h terms. Three passes per
step, all with ``torch.autograd.grad`` (no ``.grad`` reads or writes between them, D-B3); θ is restored by copying
the saved tensors, bit-identical (D-B2); both h passes run under the same RNG state (same dropout masks).
:class:`BoosterSFTTrainer` is trl's ``SFTTrainer`` with that step, drawing harmful batches from its own shuffled,
cycled loader (D-B4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..errors import UsageError
from .vaccine import NORM_EPS, global_norm, metrics_unchanged, same_rng, wide

LAMBDA = 5.0  # spec/defences.md §2 hyperparameters (script/alignment/smooth_align.sh; paper)
ALPHA = 0.1  # spec/defences.md §2 hyperparameters (script and train.py --alpha)


def check_lambda(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise UsageError(f"booster lam: {lam!r} is not allowed; the regulariser weight λ must be a number ≥ 0 "
                         f"(spec/defences.md §2; default {LAMBDA})")
    return float(lam)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise UsageError(f"booster alpha: {alpha!r} is not allowed; the simulated step size α must be a number ≥ 0 "
                         f"(spec/defences.md §2; default {ALPHA})")
    return float(alpha)


def check_batch_size(size: int | None) -> int | None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UsageError(f"booster harmful_batch_size: {size!r} is not allowed; use a whole number ≥ 1, or None for "
                         "the alignment batch size (spec/defences.md §2 D-B4)")
    return size


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class HarmfulStep(NamedTuple):
    """Passes 1 and 2: ∇h(θ), ∇h(θ̃) and the losses h(θ), h(θ̃) (detached)."""

    grad: list[torch.Tensor]
    grad_tilde: list[torch.Tensor]
    loss: torch.Tensor
    loss_tilde: torch.Tensor

    @property
    def regulariser(self) -> torch.Tensor:
        """h(θ) − h(θ̃)."""
        return self.loss - self.loss_tilde

    def regulariser_grad(self, lam: float) -> list[torch.Tensor]:
        """λ · (∇h(θ) − ∇h(θ̃))."""
        return [lam * (g - gt) for g, gt in zip(self.grad, self.grad_tilde)]


def simulated_harmful_step(params: Sequence[torch.Tensor], h_loss_fn: Callable[[Any], torch.Tensor],
                           harmful_batch: Any, alpha: float = ALPHA) -> HarmfulStep:
    """Passes 1–2 of spec/defences.md §2: g_h = ∇h(θ; z); u = g_h / (‖g_h‖ + 1e-7) (fp32 global norm);
    θ ← θ − α·u; g_h~ = ∇h(θ; z); θ ← θ_saved by copy (bit-identical, D-B2, also on error). Same RNG state for
    both passes."""
    alpha = check_alpha(alpha)
    params = list(params)
    device = params[0].device if params else None
    with same_rng(device):
        h = h_loss_fn(harmful_batch)
        g_h = _grads(h, params)
    norm = global_norm(g_h)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, g_h):
                p.sub_((alpha * wide(g) / (norm.to(g.device) + NORM_EPS)).to(p.dtype))
        h_tilde = h_loss_fn(harmful_batch)
        g_h_tilde = _grads(h_tilde, params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return HarmfulStep(g_h, g_h_tilde, h.detach(), h_tilde.detach())


class BoosterGradient(NamedTuple):
    """The combined gradient g (one tensor per parameter) and the values of the step (detached)."""

    grads: list[torch.Tensor]
    f: torch.Tensor
    h: torch.Tensor
    h_tilde: torch.Tensor
    lam: float

    @property
    def regulariser(self) -> torch.Tensor:
        """h(θ) − h(θ̃)."""
        return self.h - self.h_tilde

    @property
    def objective(self) -> torch.Tensor:
        """f(θ) + λ · (h(θ) − h(θ̃))."""
        return self.f + self.lam * self.regulariser


def booster_gradient(params: Sequence[torch.Tensor], f_loss_fn: Callable[[Any], torch.Tensor],
                     h_loss_fn: Callable[[Any], torch.Tensor], align_batch: Any, harmful_batch: Any,
                     lam: float = LAMBDA, alpha: float = ALPHA) -> BoosterGradient:
    """One Booster step (spec/defences.md §2): passes 1–2 (:func:`simulated_harmful_step`), then pass 3
    g_f = ∇f(θ; a); returns g = ∇f + λ·(∇h(θ) − ∇h(θ̃)) for the caller to add to ``.grad`` (D-B3). Nothing is
    written to ``.grad``; θ is unchanged on return. ``f_loss_fn(align_batch)`` and ``h_loss_fn(harmful_batch)``
    compute the losses with ``params``."""
    lam = check_lambda(lam)
    params = list(params)
    step = simulated_harmful_step(params, h_loss_fn, harmful_batch, alpha)
    f = f_loss_fn(align_batch)
    g_f = _grads(f, params)
    grads = [gf + r for gf, r in zip(g_f, step.regulariser_grad(lam))]
    return BoosterGradient(grads, f.detach(), step.loss, step.loss_tilde, lam)


def add_to_grad(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """``p.grad += g`` for each parameter (``p.grad = g`` when it has none): accumulation as ``backward`` does."""
    for p, g in zip(params, grads):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g


def linear_surrogate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """s − sg[s] with s = Σ ⟨θ, r⟩: value exactly 0, gradient r. Added to a loss, its backward adds r to ``.grad``
    through the ordinary backward (gradient scaling, DDP reduction)."""
    s = sum((p * r.detach().to(p.dtype)).sum() for p, r in zip(params, grads))
    return s - s.detach()


# --------------------------------------------------------------------------------------------- trl trainer
class BoosterMixin:
    """The Booster step for a trl trainer (spec/defences.md §2). ``training_step`` draws a harmful batch, runs
    passes 1–2 with the trainer's ``compute_loss`` (per-batch token mean, RNG restored, no ``.grad`` writes), then
    the parent's ``training_step`` for pass 3, whose loss carries :func:`linear_surrogate` of λ·(∇h − ∇h̃) scaled
    to the gradient-accumulation average: the optimizer receives ∇f + λ(∇h − ∇h̃) per micro-batch average, and the
    logged loss is f. Keywords: ``harmful_dataset`` (required: rows in the training dataset's format),
    ``lam`` (5.0), ``alpha`` (0.1), ``harmful_batch_size`` (None: the per-device alignment batch size)."""

    def __init__(self, *args, harmful_dataset=None, lam: float = LAMBDA, alpha: float = ALPHA,
                 harmful_batch_size: int | None = None, **kwargs):
        if harmful_dataset is None or len(harmful_dataset) == 0:
            raise UsageError("booster: harmful_dataset is required and must not be empty (harmful QA rows in the "
                             "alignment data's format; spec/defences.md §2 D-B5)")
        self.lam, self.alpha = check_lambda(lam), check_alpha(alpha)
        self.harmful_batch_size = check_batch_size(harmful_batch_size)
        super().__init__(*args, **kwargs)
        self.harmful_dataset = self._prepare_harmful(harmful_dataset)
        self._harmful_loader = self._harmful_iter = None
        self._booster_pending: list[torch.Tensor] | None = None
        self._booster_log: list[tuple[float, float]] = []  # (regulariser, harmful loss) per micro-batch

    def _prepare_harmful(self, rows):
        from datasets import Dataset

        dataset = Dataset.from_list(list(rows)) if isinstance(rows, (list, tuple)) else rows
        if getattr(self, "_skip_prepare_dataset", False):
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, False,
                                     getattr(self, "_formatting_func", None), "harmful")

    def harmful_dataloader(self):
        """Shuffled (seeded by ``args.seed``) loader of the harmful rows, through the trainer's collator."""
        from torch.utils.data import RandomSampler

        size = self.harmful_batch_size or self.args.per_device_train_batch_size
        generator = torch.Generator().manual_seed(self.args.seed)
        return self._get_dataloader(self.harmful_dataset, "harmful", size,
                                    sampler_fn=lambda ds: RandomSampler(ds, generator=generator))

    def next_harmful_batch(self):
        """The next harmful batch; the loader restarts, reshuffled, when exhausted (D-B4)."""
        if self._harmful_loader is None:
            self._harmful_loader = self.harmful_dataloader()
        if self._harmful_iter is not None:
            batch = next(self._harmful_iter, None)
            if batch is not None:
                return batch
        self._harmful_iter = iter(self._harmful_loader)
        return next(self._harmful_iter)

    def _ga_divides_loss(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` divides the loss by the accumulation steps (its own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return not scaled

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        harmful = self._prepare_inputs(self.next_harmful_batch())
        params = [p for p in model.parameters() if p.requires_grad]

        def h_loss_fn(batch):
            with self.compute_loss_context_manager():
                return self.compute_loss(model, dict(batch))

        with metrics_unchanged(self), self.accelerator.no_sync(model):
            step = simulated_harmful_step(params, h_loss_fn, harmful, self.alpha)
        scale = 1.0 if self._ga_divides_loss(num_items_in_batch) else 1.0 / self.current_gradient_accumulation_steps
        self._booster_pending = [scale * r for r in step.regulariser_grad(self.lam)]
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._booster_pending = None
        self._booster_log.append((step.regulariser.item(), step.loss.item()))
        if hasattr(self, "_metrics"):
            self._metrics["train"]["booster/regulariser"].append(step.regulariser.item())
            self._metrics["train"]["booster/harmful_loss"].append(step.loss.item())
        return loss

    def defence_record(self) -> dict:
        """What the run did, for its manifest: λ, α, the harmful rows and batch, and the mean regulariser
        h(θ) − h(θ̃) and harmful loss h(θ) over the micro-batches (first and last)."""
        log = self._booster_log
        mean = (lambda i: sum(x[i] for x in log) / len(log)) if log else (lambda i: None)
        return {"defence": "booster", "lam": self.lam, "alpha": self.alpha, "harmful_rows": len(self.harmful_dataset),
                "harmful_batch_size": self.harmful_batch_size or self.args.per_device_train_batch_size,
                "micro_batches": len(log), "mean_regulariser": mean(0), "mean_harmful_loss": mean(1),
                "first_harmful_loss": log[0][1] if log else None, "last_harmful_loss": log[-1][1] if log else None}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        pending, self._booster_pending = self._booster_pending, None
        if pending is None:
            return out
        params = [p for p in model.parameters() if p.requires_grad]
        extra = linear_surrogate(params, pending)
        return (out[0] + extra, out[1]) if return_outputs else out + extra


_TRAINERS: dict[str, type] = {}


def __getattr__(name: str):
    """``BoosterSFTTrainer`` is built on first use, so importing this module does not import trl."""
    if name != "BoosterSFTTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _TRAINERS:
        from trl import SFTTrainer

        _TRAINERS[name] = type(name, (BoosterMixin, SFTTrainer), {"__module__": __name__, "__doc__": (
            "trl ``SFTTrainer`` with the Booster step (spec/defences.md §2): f = SFT cross-entropy on the "
            "alignment batch, h = the same loss on a harmful batch. Keywords ``harmful_dataset`` (prompt/completion "
            "rows, required), ``lam`` (5.0), ``alpha`` (0.1), ``harmful_batch_size`` (None = alignment batch).")})
    return _TRAINERS[name]


