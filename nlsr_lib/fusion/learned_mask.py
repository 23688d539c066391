"""SOMF's learned safety mask over LoRA task vectors (spec/somf.md §2, §6; DESIGN.md §6).

One set of logits ``L[k]`` per task-vector tensor, **shared by every task** (somf §2.2), defines a concrete
(relaxed Bernoulli) mask at temperature ``T`` (0.5, fixed)::

    u ~ U(0, 1),  g = log u − log(1 − u),  m = σ((L + g) / T)                    (a fresh sample per step)
    τ̃_i[k] = τ_i[k] ⊙ m[k] / mean(m[k])                                          (somf §2.3; ``rescale: none`` drops
                                                                                    the division)
    θ(m) = θ_aligned + Merge({τ̃_i})                                              (one task: Merge = identity, §3.6)

with ``τ_i = θ_i − θ_aligned`` taken key by key on the LoRA factors (somf §2.1: every task adapter continued
training from the aligned adapter). Only ``L`` is trained, with the sigmoid DPO loss on safety preference pairs
(chosen = the safe response), log-probabilities summed over response tokens (§2.4)::

    ℓ = −log σ(β[(log π_θ(m)(y_w|x) − log π_θ(m)(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x))])

Decisions (somf §6): the reference is the **task model** ``θ_aligned + Merge({τ_i})`` (mask ≡ 1, deterministic, the
policy's mean at init; §6.1), its log-probabilities computed once per batch without gradient; the exported mask is
``b = 1[L > 0]`` (= ``σ(L) > 0.5``, §6.3), option ``bernoulli`` (one seeded ``Bernoulli(σ(L))`` sample, the SOMF
code) or ``soft`` (``m = σ(L)``, §6.2); a tensor whose exported mask is all zero keeps ``θ_aligned``
(``τ̃ = 0`` instead of the code's 0/0). Mask maths in fp32 (§6.20); TIES and DARE stay differentiable in the kept
values (their trim and drop masks are constants, §6.7). The base model and the task vectors are never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .inmemory import merge_task_vectors

EXPORTS = ("threshold", "bernoulli", "soft")
RESCALES = ("mean", "none")


class ConcreteMask(torch.nn.Module):
    """Logits ``L[k]`` of one shared mask over task-vector tensors ``k`` (fp32), temperature ``T``."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], temperature: float = 0.5, init_logit: float = 0.0,
                 device: torch.device | str = "cpu"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"concrete mask temperature must be > 0, got {temperature}")
        if not shapes:
            raise ValueError("concrete mask: no tensors to mask")
        self.keys = sorted(shapes)
        self.temperature = float(temperature)
        self.logits = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full(tuple(shapes[k]), float(init_logit), device=device)) for k in self.keys])

    def items(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        return zip(self.keys, self.logits)

    @staticmethod
    def logistic_noise(shape: Sequence[int], generator: torch.Generator, device) -> torch.Tensor:
        """``g = log u − log(1 − u)``, ``u ~ U(0, 1)`` drawn on the CPU generator (same draws on every device)."""
        u = torch.rand(tuple(shape), generator=generator).clamp_(1e-6, 1.0 - 1e-6)
        return (torch.log(u) - torch.log1p(-u)).to(device)

    def relaxed(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One reparameterised sample ``m = σ((L + g)/T)`` per tensor (differentiable in ``L``)."""
        return {k: torch.sigmoid((lg + self.logistic_noise(lg.shape, generator, lg.device)) / self.temperature)
                for k, lg in self.items()}

    def probs(self) -> dict[str, torch.Tensor]:
        """The keep probabilities ``σ(L)``."""
        return {k: torch.sigmoid(lg.detach()) for k, lg in self.items()}

    def export(self, mode: str = "threshold", seed: int = 42) -> dict[str, torch.Tensor]:
        """The exported mask: ``1[L > 0]`` (threshold), ``1[L + g > 0] ~ Bernoulli(σ(L))`` (bernoulli), ``σ(L)``."""
        if mode not in EXPORTS:
            raise ValueError(f"unknown mask export {mode!r}; allowed: {', '.join(EXPORTS)}")
        if mode == "soft":
            return self.probs()
        if mode == "threshold":
            return {k: (lg.detach() > 0).float() for k, lg in self.items()}
        gen = torch.Generator().manual_seed(seed)
        return {k: ((lg.detach() + self.logistic_noise(lg.shape, gen, lg.device)) > 0).float() for k, lg in self.items()}

    def statistics(self) -> dict[str, float]:
        """Keep rate ``mean 1[σ(L) > 0.5]`` and mean ``σ(L)`` over every entry (somf §6.6's log)."""
        total = sum(lg.numel() for lg in self.logits)
        kept = sum(int((lg.detach() > 0).sum()) for lg in self.logits)
        mean_p = sum(float(torch.sigmoid(lg.detach()).sum()) for lg in self.logits) / total
        return {"keep_rate": kept / total, "mean_probability": mean_p}

    def state(self) -> dict[str, torch.Tensor]:
        """``{key: logits}`` for safetensors (no pickle)."""
        return {k: lg.detach().cpu().contiguous() for k, lg in self.items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.keys) - set(state)
        if missing:
            raise ValueError(f"mask logits missing for {sorted(missing)[:5]}")
        with torch.no_grad():
            for k, lg in self.items():
                if tuple(state[k].shape) != tuple(lg.shape):
                    raise ValueError(f"mask logits {k}: shape {tuple(state[k].shape)} but the task vector is "
                                     f"{tuple(lg.shape)}")
                lg.copy_(state[k])


def mask_task_vectors(taus: Sequence[Mapping[str, torch.Tensor]], mask: Mapping[str, torch.Tensor], *,
                      rescale: str = "mean", detach_mean: bool = False) -> list[dict[str, torch.Tensor]]:
    """``τ̃_i[k] = τ_i[k] ⊙ m[k] / mean(m[k])`` (``rescale: none``: ``τ_i ⊙ m``); ``τ̃ = 0`` where ``mean(m) = 0``."""
    if rescale not in RESCALES:
        raise ValueError(f"unknown mask rescale {rescale!r}; allowed: {', '.join(RESCALES)}")
    out = [dict() for _ in taus]
    for k, m in mask.items():
        if rescale == "mean":
            scale = m.mean().detach() if detach_mean else m.mean()
            factor = m / scale if float(scale.detach()) > 0 else torch.zeros_like(m)
        else:
            factor = m
        for tv, dst in zip(taus, out):
            if tuple(tv[k].shape) != tuple(m.shape):
                raise ValueError(f"mask {k}: shape {tuple(m.shape)} but the task vector is {tuple(tv[k].shape)}")
            dst[k] = tv[k] * factor
    return out


@dataclass(frozen=True)
class Fusion:
    """``θ_aligned + Merge({τ_i ⊙ m / mean m})``: the aligned adapter, the task vectors and the merge settings."""

    aligned: Mapping[str, torch.Tensor]
    taus: Sequence[Mapping[str, torch.Tensor]]
    merge: str = "task_arithmetic"
    merge_params: Mapping = field(default_factory=dict)
    scope: str = "tensor"
    rescale: str = "mean"
    detach_mean: bool = False

    def __post_init__(self):
        if not self.taus:
            raise ValueError("learned mask: no task vectors")
        for i, tv in enumerate(self.taus):
            if set(tv) != set(self.aligned):
                diff = sorted(set(tv) ^ set(self.aligned))[:5]
                raise ValueError(f"task vector {i} and the aligned adapter have different keys: {diff}")

    def delta(self, mask: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``Merge({τ̃_i})``; ``mask=None`` is the task model (mask ≡ 1). One task: the identity merge."""
        taus = list(self.taus) if mask is None else mask_task_vectors(self.taus, mask, rescale=self.rescale,
                                                                       detach_mean=self.detach_mean)
        if len(taus) == 1:
            return dict(taus[0])
        return merge_task_vectors(taus, self.merge, scope=self.scope, **self.merge_params)

    def state(self, mask: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The fused adapter's factors in fp32 (differentiable in the mask)."""
        delta = self.delta(mask)
        return {k: self.aligned[k].float() + delta[k] for k in self.aligned}


def _pair_logps(model, overrides: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed response-token log-probabilities of ``[chosen; rejected]`` (one forward) under ``model`` with its
    parameters ``overrides`` substituted functionally (``torch.func.functional_call``)."""
    from ..regions.snip import sequence_logps

    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(name: str, fill: int) -> torch.Tensor:
        return torch.cat([F.pad(batch[f"{side}_{name}"], (0, width - batch[f"{side}_{name}"].shape[1]), value=fill)
                          for side in ("chosen", "rejected")])

    def substituted(**kwargs):
        return torch.func.functional_call(model, dict(overrides), args=(), kwargs=kwargs, strict=False)

    return sequence_logps(substituted, both("input_ids", 0), both("attention_mask", 0), both("labels", -100))


def lora_parameter_names(model) -> dict[str, str]:
    """``{adapter key: the model's parameter name}`` for every LoRA matrix of the active adapter."""
    from ..regions.lora import lora_matrices

    names = {id(p): n for n, p in model.named_parameters()}
    return {m.key: names[id(m.weight)] for m in lora_matrices(model)}


def train_mask(model, fusion: Fusion, batches: Sequence[Mapping[str, torch.Tensor]], *, temperature: float = 0.5,
               init_logit: float = 0.0, beta: float = 0.1, learning_rate: float = 5e-3, epochs: float = 3.0,
               seed: int = 42, show_progress: bool = True) -> tuple[ConcreteMask, list[dict]]:
    """Learn the shared mask's logits with the DPO loss (module docstring); AdamW on ``L`` only, cosine schedule,
    no warmup (somf §2.5, §2.7). ``model`` is the base with the aligned adapter as a ``peft.PeftModel``; its LoRA
    weights are substituted functionally at every step, never written. Returns the mask and a per-step history."""
    from ..regions.activations import input_device, progress
    from ..train.guards import check_finite_loss

    if not batches:
        raise ValueError("learned mask: no preference batches to train on")
    names = lora_parameter_names(model)
    if set(names) != set(fusion.aligned):
        diff = sorted(set(names) ^ set(fusion.aligned))[:5]
        raise ValueError(f"the model's LoRA matrices and the adapters' keys differ: {diff}")
    device = input_device(model)
    dtype = next(model.parameters()).dtype
    aligned = {k: v.to(device) for k, v in fusion.aligned.items()}
    taus = [{k: v.to(device) for k, v in tv.items()} for tv in fusion.taus]
    fusion = Fusion(aligned, taus, fusion.merge, fusion.merge_params, fusion.scope, fusion.rescale,
                    fusion.detach_mean)
    mask = ConcreteMask({k: v.shape for k, v in aligned.items()}, temperature, init_logit, device)
    steps = max(1, math.ceil(len(batches) * epochs))
    optimizer = torch.optim.AdamW(mask.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.Generator().manual_seed(seed + 1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def overrides(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {names[k]: v.to(dtype) for k, v in state.items()}

    reference = overrides({k: v.detach() for k, v in fusion.state(None).items()})
    history = []
    was_training = model.training
    model.eval()  # dropout off in policy and reference (somf §2.4)
    try:
        schedule_iter = (batches[i] for _ in range(math.ceil(epochs) + 1)
                         for i in torch.randperm(len(batches), generator=order).tolist())
        for step in progress(range(steps), "learned mask", total=steps, enabled=show_progress):
            batch = {k: v.to(device) for k, v in next(schedule_iter).items()}
            n = batch["chosen_input_ids"].shape[0]
            with torch.no_grad():
                ref = _pair_logps(model, reference, batch)
            policy = _pair_logps(model, overrides(fusion.state(mask.relaxed(generator))), batch)
            margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
            loss = -F.logsigmoid(beta * margin).mean()
            check_finite_loss(loss, "learned mask", step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            margin = margin.detach()
            history.append({"step": step, "loss": float(loss.detach()), "reward_margin": float(beta * margin.mean()),
                            "accuracy": float((margin > 0).float().mean()), **mask.statistics()})
    finally:
        for n_, p in model.named_parameters():
            p.requires_grad_(flags[n_])
        model.train(was_training)
    return mask, history


def fused_adapter_state(fusion: Fusion, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``θ_aligned + Merge({τ_i ⊙ b / mean b})`` for a fixed mask ``b`` (fp32 factors on the CPU, no gradient)."""
    cpu = Fusion({k: v.cpu() for k, v in fusion.aligned.items()}, [{k: v.cpu() for k, v in tv.items()}
                                                                      for tv in fusion.taus],
                 fusion.merge, fusion.merge_params, fusion.scope, fusion.rescale, fusion.detach_mean)
    with torch.no_grad():
        return cpu.state({k: v.cpu() for k, v in mask.items()})


def export_adapter_state(fusion: Fusion, mask: ConcreteMask, mode: str = "threshold",
                         seed: int = 42) -> dict[str, torch.Tensor]:
    """The fused adapter with the exported mask ``b`` (:meth:`ConcreteMask.export`)."""
    return fused_adapter_state(fusion, mask.export(mode, seed))


def permuted_mask(mask: Mapping[str, torch.Tensor], seed: int = 42) -> dict[str, torch.Tensor]:
    """The control of a learned mask: each tensor's entries randomly permuted (a seeded generator per tensor, in
    key order), so the keep count per tensor — and for a soft mask every value — is kept but not the positions."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(mask):
        flat = mask[k].reshape(-1)
        out[k] = flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)].reshape(mask[k].shape)
    return out
