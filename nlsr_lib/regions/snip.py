"""Gradient scorers: ``snip`` (the reference code's "wandg") and ``preference_snip`` (spec nlsr.md §4.3-4.4,
§9.6, §9.24; merging.md §3.2; DESIGN §6 "SNIP gradients").

    ``S_ij = |W_ij| · Σ_n |∂ℓ_n / ∂W_ij|``

with one loss ``ℓ_n`` per calibration sample and the gradient **zeroed between samples** (the method as
published, and the alignment-attribution code). ``cumulative_grad=True`` reproduces the NLSR reference code,
which never zeroes ``.grad``: ``S = |W| · Σ_n |Σ_{k≤n} ∇ℓ_k|`` (spec §9.6).

* ``snip``: ``ℓ_n`` = the HF causal-LM loss of sample ``n`` alone — the mean token cross-entropy over its response
  tokens (labels ≠ −100), so every sample weighs the same whatever its length (spec §9.24).
* ``preference_snip``: ``ℓ_n`` = the DPO loss of pair ``n``,
  ``−log σ(β[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])``, β = 0.1,
  log-probabilities summed over response tokens, π = base + reference LoRA, π_ref = the same model with the
  adapter disabled (spec §4.4).

Every LoRA matrix gets its gradient from the same backward pass (one forward + backward per sample for the whole
model, DESIGN §5), instead of the reference code's pass per layer. Consequently the reference code's zeroing of
layer ``i``'s pruned entries before layer ``i+1``'s gradients (spec §4.3) is not reproduced: the scores are those
of the reference model as it is. Samples are taken one at a time (padding trimmed) because per-sample absolute
gradients cannot be summed inside a batch.

``snip_set_difference`` compares these scores on safety and utility data (merging.md §3.2).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from .activations import _EvalMode, input_device, progress
from .lora import LoraMatrix, lora_matrices
from .registry import register_scorer, register_set_difference


class _LoraGradients:
    """Only the LoRA matrices require gradients inside the block (flags restored afterwards)."""

    def __init__(self, model: torch.nn.Module, matrices: list[LoraMatrix]):
        self.model, self.ids = model, {id(m.weight) for m in matrices}

    def __enter__(self):
        self.flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in self.ids)
        return self

    def __exit__(self, *exc):
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags[n])


class _GradientSum:
    """``G += |g|`` per sample, or ``running += g; G += |running|`` with ``cumulative`` (reference code)."""

    def __init__(self, matrices: list[LoraMatrix], cumulative: bool):
        self.total = [torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for m in matrices]
        self.running = [torch.zeros_like(t) for t in self.total] if cumulative else None
        self.samples = 0

    def add(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        self.samples += 1
        for i, g in enumerate(grads):
            if g is None:
                g = torch.zeros_like(self.total[i])
            if self.running is None:
                self.total[i].add_(g.float().abs())
            else:
                self.running[i].add_(g.float())
                self.total[i].add_(self.running[i].abs())


def _rows(batch: Mapping[str, torch.Tensor], prefix: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of every sample of a batch, padding removed."""
    ids, mask, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"]
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        yield ids[i][keep], labels[i][keep]


def _scores(matrices: list[LoraMatrix], acc: _GradientSum) -> dict[str, torch.Tensor]:
    if acc.samples == 0:
        raise ValueError("no calibration sample has a response token to score")
    return {m.key: (m.weight.detach().float().abs() * g).cpu() for m, g in zip(matrices, acc.total)}


@register_scorer("snip", selection="rowwise", options=("cumulative_grad",))
def snip_scores(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                cumulative_grad: bool = False, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """``|W| · Σ_n |∇_W ℓ_n|`` with ``ℓ_n`` the sample's mean response-token cross-entropy (spec §4.3)."""
    matrices = lora_matrices(model)
    weights = [m.weight for m in matrices]
    acc = _GradientSum(matrices, cumulative_grad)
    device = input_device(model)
    with _LoraGradients(model, matrices), _EvalMode(model):
        for batch in progress(batches, "snip", enabled=show_progress):
            for ids, labels in _rows(batch):
                if not bool((labels[1:] != -100).any()):
                    continue
                loss = model(input_ids=ids[None].to(device), labels=labels[None].to(device), use_cache=False).loss
                acc.add(torch.autograd.grad(loss, weights, allow_unused=True))
    return _scores(matrices, acc)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """``Σ_t log π(label_{t+1} | ≤ t)`` over the response tokens of each row (fp32), the DPO log-likelihood."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """``−log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` on summed log-probabilities (spec §4.4)."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))


def _pad_pair(chosen: tuple[torch.Tensor, torch.Tensor], rejected: tuple[torch.Tensor, torch.Tensor]):
    """[chosen; rejected] right-padded to one length: (input_ids, attention_mask, labels)."""
    width = max(chosen[0].numel(), rejected[0].numel())
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100, dtype=torch.long)
    for row, (i, lab) in enumerate((chosen, rejected)):
        ids[row, : i.numel()], mask[row, : i.numel()], labels[row, : i.numel()] = i, 1, lab
    return ids, mask, labels


@register_scorer("preference_snip", selection="rowwise", data="preference", options=("cumulative_grad", "beta"))
def preference_snip_scores(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                           cumulative_grad: bool = False, beta: float = 0.1,
                           show_progress: bool = True) -> dict[str, torch.Tensor]:
    """``|W| · Σ_n |∇_W ℓ_n|`` with ``ℓ_n`` the DPO loss of preference pair ``n`` (spec §4.4)."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("preference_snip needs a peft.PeftModel (the reference policy is the adapter disabled)")
    matrices = lora_matrices(model)
    weights = [m.weight for m in matrices]
    acc = _GradientSum(matrices, cumulative_grad)
    device = input_device(model)
    with _LoraGradients(model, matrices), _EvalMode(model):
        for batch in progress(batches, "preference_snip", enabled=show_progress):
            for chosen, rejected in zip(_rows(batch, "chosen_"), _rows(batch, "rejected_")):
                if not (bool((chosen[1][1:] != -100).any()) and bool((rejected[1][1:] != -100).any())):
                    continue
                ids, mask, labels = (t.to(device) for t in _pad_pair(chosen, rejected))
                with torch.no_grad(), model.disable_adapter():
                    ref = sequence_logps(model, ids, mask, labels)
                policy = sequence_logps(model, ids, mask, labels)
                loss = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta)
                acc.add(torch.autograd.grad(loss, weights, allow_unused=True))
    return _scores(matrices, acc)


register_set_difference("snip_set_difference", base="snip")
