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

Scale (8B): a step's batch of pairs runs in micro-batches (``micro_batch`` pairs per forward/backward) with the
gradient accumulated, which is exact: one relaxed sample ``m`` per step is shared by every micro-batch, the fused
factors ``θ(m)`` are computed once, each micro-batch backpropagates its share ``Σ_{i∈mb} ℓ_i / N`` of the batch mean
into ``θ(m)`` (detached leaves), and one backward through the fusion carries the summed gradient to ``L``. Log-probs
can be computed ``logprob_chunk`` response tokens at a time from the decoder's hidden states (:func:`label_logps`,
each chunk recomputed in backward), so the full ``[pairs, seq, vocab]`` fp32 logits never exist; decoder layers can
be checkpointed (non-reentrant, dropout still off). The defaults (whole batch, full logits) are the one-pass
computation.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

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


def label_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                chunk: int = 0) -> torch.Tensor:
    """``Σ_t log π(label_{t+1} | ≤ t)`` over the response tokens (labels ≠ −100) of each row, in fp32.

    ``chunk`` = 0: from the full logits (:func:`~nlsr_lib.regions.snip.sequence_logps`). ``chunk`` > 0: the
    decoder's last hidden states are gathered at the response positions and projected by the output layer
    ``chunk`` tokens at a time, ``log π = logit[label] − logsumexp(logits)`` in fp32, each chunk under a
    non-reentrant checkpoint (only its hidden states are kept; its logits are recomputed in backward), so memory
    holds one chunk's ``[chunk, vocab]`` logits instead of ``[rows, seq, vocab]``. Needs an output layer that is a
    plain ``Linear`` applied to the last hidden state (Llama, Mistral, Qwen2; :func:`check_chunked_logits` tests it
    on the model)."""
    from ..regions.snip import sequence_logps

    if chunk <= 0:
        return sequence_logps(model, input_ids, attention_mask, labels)
    base, head = _decoder_and_head(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    rows, cols = (target != -100).nonzero(as_tuple=True)
    states, tokens = hidden[:, :-1][rows, cols], target[rows, cols]
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, len(tokens), chunk):
        part = torch.utils.checkpoint.checkpoint(_token_logps, states[s:s + chunk], head.weight, head.bias,
                                                 tokens[s:s + chunk], use_reentrant=False)
        out = out.index_add(0, rows[s:s + chunk], part)
    return out


def _token_logps(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 tokens: torch.Tensor) -> torch.Tensor:
    logits = F.linear(states, weight, bias).float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _decoder_and_head(model):
    """(the transformers model under a PEFT wrapper, its output layer), refusing an output layer that is not a plain
    ``torch.nn.Linear`` (e.g. a LoRA on ``lm_head``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"learned mask: logprob_chunk needs the output layer to be a plain Linear, got "
                         f"{type(head).__name__}; set fusion.learned_mask.logprob_chunk: 0 (full logits)")
    return base, head


def check_chunked_logits(model, input_ids: torch.Tensor, tokens: int = 16) -> None:
    """Refuse :func:`label_logps` chunks when the model's logits are not ``lm_head(last hidden state)`` (logit
    soft-capping or scaling): both are computed on the first ``tokens`` of one row and compared."""
    base, head = _decoder_and_head(model)
    ids = input_ids[:1, :tokens]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        mine = F.linear(base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state, head.weight,
                        head.bias).float()
    if not torch.allclose(full, mine, rtol=1e-3, atol=1e-3):
        raise ValueError(f"learned mask: {type(base).__name__}'s logits are not its output layer applied to the last "
                         "hidden state (soft-capping or scaling?); set fusion.learned_mask.logprob_chunk: 0")


def pair_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[chosen; rejected]`` right-padded to one width: (input_ids, attention_mask, labels)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(name: str, fill: int) -> torch.Tensor:
        return torch.cat([F.pad(batch[f"{side}_{name}"], (0, width - batch[f"{side}_{name}"].shape[1]), value=fill)
                          for side in ("chosen", "rejected")])

    return both("input_ids", 0), both("attention_mask", 0), both("labels", -100)


def _pair_logps(model, overrides: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                chunk: int = 0) -> torch.Tensor:
    """Summed response-token log-probabilities of ``[chosen; rejected]`` (one forward) under ``model`` with its
    parameters ``overrides`` substituted functionally (``torch.func.functional_call``)."""

    def substituted(input_ids, attention_mask, labels):
        return label_logps(model, input_ids, attention_mask, labels, chunk)

    return torch.func.functional_call(_Call(substituted, model), {f"model.{k}": v for k, v in overrides.items()},
                                      args=pair_inputs(batch), strict=False)


class _Call(torch.nn.Module):
    """``fn(*args)`` as the forward of a module holding ``model``, so that ``functional_call`` substitutes the
    model's parameters (``model.<name>``) for the whole of ``fn`` — a backward run inside ``fn`` included, which
    checkpointed layers need: their recomputation must see the substituted weights."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn = fn
        self.model = model

    def forward(self, *args):
        return self.fn(*args)


def micro_batches(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` in slices of ``size`` pairs (0 or ≥ the batch: the batch itself), each side cut to its longest
    row (right padding: the attention mask's longest run)."""
    n = batch["chosen_input_ids"].shape[0]
    if size <= 0 or size >= n:
        return [dict(batch)]
    out = []
    for start in range(0, n, size):
        part = {k: v[start:start + size] for k, v in batch.items()}
        for side in ("chosen", "rejected"):
            width = max(int(part[f"{side}_attention_mask"].sum(1).max()), 1)
            for name in ("input_ids", "attention_mask", "labels"):
                part[f"{side}_{name}"] = part[f"{side}_{name}"][:, :width]
        out.append(part)
    return out


@contextmanager
def checkpointing(model, enabled: bool = True) -> Iterator[None]:
    """Non-reentrant gradient checkpointing of the decoder layers while the model stays in eval mode: only each
    checkpointing layer's own ``training`` flag is set (transformers checkpoints a layer when it is training), so
    dropout inside stays off. Everything is restored on exit."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"learned mask: {type(base).__name__} does not support gradient checkpointing; set "
                         "fusion.learned_mask.gradient_checkpointing: false")
    was_enabled = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    had_hooks = bool(getattr(base, "_require_grads_hooks", None))
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # transformers < 5.x
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True  # the flag only (not .train()): the layer's submodules stay in eval mode
    try:
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag
        if not was_enabled:
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
            if not had_hooks:
                base.disable_input_require_grads()


@dataclass
class MaskObjective:
    """The DPO loss of the masked fusion on one step's batch and its gradient, in micro-batches (module docstring).

    ``names`` maps adapter keys to the model's parameter names; ``reference`` is the reference's overrides (by
    parameter name, model dtype); ``checkpointed``: the model's layers are checkpointed (:func:`checkpointing`), so
    every backward through the model runs inside the parameter substitution. :meth:`backward` leaves ``∂ℓ/∂L`` in
    the graph's leaves (the mask logits)."""

    model: torch.nn.Module
    names: Mapping[str, str]
    reference: Mapping[str, torch.Tensor]
    dtype: torch.dtype
    beta: float = 0.1
    micro_batch: int = 0
    logprob_chunk: int = 0
    checkpointed: bool = False

    def backward(self, state: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                 check=None) -> torch.Tensor:
        """Backpropagate ``ℓ = mean_i −log σ(β·margin_i)`` over the pairs of ``batch`` into ``state`` (the fused
        factors ``θ(m)``, fp32, differentiable in the mask) and through it; returns the detached margins.
        ``check(loss)`` runs on the loss before the backward through the fusion (the no-NaN guard)."""
        total = batch["chosen_input_ids"].shape[0]
        parts = micro_batches(batch, self.micro_batch)
        if len(parts) == 1 and not self.checkpointed:  # one pass: the model's gradient flows into the fusion
            margin, loss = self._micro(state, parts[0], 1.0)
            if check is not None:
                check(loss)
            loss.backward()
            return margin
        leaves = {k: v.detach().requires_grad_() for k, v in state.items()}
        margins = []
        for part in parts:  # each backward stops at the leaves: one micro-batch of activations at a time
            margins.append(self._micro(leaves, part, part["chosen_input_ids"].shape[0] / total, backward=True)[0])
        margin = torch.cat(margins)
        if check is not None:
            check(-F.logsigmoid(self.beta * margin).mean())
        keys = [k for k in state if leaves[k].grad is not None]
        torch.autograd.backward([state[k] for k in keys], [leaves[k].grad for k in keys])
        return margin

    def _micro(self, state: Mapping[str, torch.Tensor], part: Mapping[str, torch.Tensor], share: float,
               backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n = part["chosen_input_ids"].shape[0]
        inputs = pair_inputs(part)
        with torch.no_grad():
            ref = _pair_logps(self.model, self.reference, part, self.logprob_chunk)

        def objective(input_ids, attention_mask, labels):
            policy = label_logps(self.model, input_ids, attention_mask, labels, self.logprob_chunk)
            margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
            loss = -F.logsigmoid(self.beta * margin).mean()
            if share != 1.0:
                loss = loss * share
            if backward:  # inside the substitution: checkpointed layers recompute with the fused weights
                loss.backward()
            return margin.detach(), loss

        overrides = {f"model.{self.names[k]}": v.to(self.dtype) for k, v in state.items()}
        return torch.func.functional_call(_Call(objective, self.model), overrides, args=inputs, strict=False)


def lora_parameter_names(model) -> dict[str, str]:
    """``{adapter key: the model's parameter name}`` for every LoRA matrix of the active adapter."""
    from ..regions.lora import lora_matrices

    names = {id(p): n for n, p in model.named_parameters()}
    return {m.key: names[id(m.weight)] for m in lora_matrices(model)}


def train_mask(model, fusion: Fusion, batches: Sequence[Mapping[str, torch.Tensor]], *, temperature: float = 0.5,
               init_logit: float = 0.0, beta: float = 0.1, learning_rate: float = 5e-3, epochs: float = 3.0,
               seed: int = 42, micro_batch: int = 0, logprob_chunk: int = 0, gradient_checkpointing: bool = False,
               show_progress: bool = True) -> tuple[ConcreteMask, list[dict]]:
    """Learn the shared mask's logits with the DPO loss (module docstring); AdamW on ``L`` only, cosine schedule,
    no warmup (somf §2.5, §2.7). ``model`` is the base with the aligned adapter as a ``peft.PeftModel``; its LoRA
    weights are substituted functionally at every step, never written. ``micro_batch`` (pairs per
    forward/backward, 0 = the whole batch), ``logprob_chunk`` (response tokens per log-softmax chunk, 0 = full
    logits) and ``gradient_checkpointing`` bound the memory without changing the gradient. Returns the mask and a
    per-step history."""
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

    reference = {names[k]: v.detach().to(dtype) for k, v in fusion.state(None).items()}
    objective = MaskObjective(model, names, reference, dtype, beta, micro_batch, logprob_chunk,
                              gradient_checkpointing)
    history = []
    was_training = model.training
    model.eval()  # dropout off in policy and reference (somf §2.4)
    try:
        if logprob_chunk > 0:
            check_chunked_logits(model, batches[0]["chosen_input_ids"].to(device))
        with checkpointing(model, gradient_checkpointing):
            schedule_iter = (batches[i] for _ in range(math.ceil(epochs) + 1)
                             for i in torch.randperm(len(batches), generator=order).tolist())
            for step in progress(range(steps), "learned mask", total=steps, enabled=show_progress):
                batch = {k: v.to(device) for k, v in next(schedule_iter).items()}
                optimizer.zero_grad(set_to_none=True)
                margin = objective.backward(fusion.state(mask.relaxed(generator)), batch,
                                            check=lambda loss, step=step: check_finite_loss(loss, "learned mask",
                                                                                            step + 1))
                optimizer.step()
                schedule.step()
                loss = -F.logsigmoid(beta * margin).mean()
                history.append({"step": step, "loss": float(loss), "reward_margin": float(beta * margin.mean()),
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
