"""Vaccine: perturbation-aware alignment (spec/defences.md §1).

Each step finds the worst-case perturbation of total size ρ of the activations at the perturbation sites with one
gradient, then trains on the perturbed forward pass:

    G_l = ∂f(θ, 0)/∂e_l,   ε_l = sg[ρ · G_l / (‖G‖ + 1e-7)],   g = ∇_θ f(θ, ε)

Sites (D-V1): the output of every decoder layer's self-attention module (default, ``site="attention"``) or of the
whole decoder layer (``site="block_output"``). Pass 1 takes G with ``torch.autograd.grad`` on the activations only,
so no ``.grad`` is written and gradient accumulation stays correct (D-V2); both passes run under the same RNG state
(D-V3); the norm and ε are computed in fp32 and cast to the activation dtype (D-V6); the reported loss is the
perturbed loss of pass 2 (D-V7). :class:`VaccineSFTTrainer` and :class:`VaccineDPOTrainer` are the trl trainers
with that step; the DPO reference log-probs are computed before any hook is installed (D-V4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

RHO = 2.0  # spec/defences.md §1 hyperparameters (Vaccine README, --rho default 2)
SITES = ("attention", "block_output")  # D-V1
NORM_EPS = 1e-7


def check_rho(rho: float) -> float:
    """``rho`` as a float, or :class:`UsageError` when it is negative or not a number (ρ ≥ 0 is allowed)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise UsageError(f"vaccine rho: {rho!r} is not allowed; the perturbation size ρ must be a number ≥ 0 "
                         f"(spec/defences.md §1; default {RHO})")
    return float(rho)


def check_site(site: str) -> str:
    if site not in SITES:
        raise UsageError(f"vaccine site: {site!r} is not allowed; choose one of {', '.join(SITES)} "
                         "(spec/defences.md §1 D-V1)")
    return site


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached in fp32, or in its own dtype when that is wider (fp64): the precision of norms and ε (D-V6)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖T‖ = sqrt(Σ_tensors Σ_entries x²) in fp32 (fp64 for fp64 tensors; spec/defences.md §0)."""
    if not tensors:
        return torch.zeros(())
    return torch.sqrt(sum(wide(t).pow(2).sum() for t in tensors))


def perturbation(grads: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ε_l = ρ · G_l / (‖G‖ + 1e-7), the norm global over all sites and positions, in fp32 and cast back to each
    G_l's dtype (the activation dtype; spec/defences.md §1, D-V5, D-V6). Detached."""
    rho = check_rho(rho)
    norm = global_norm(grads)
    return [(rho * wide(g) / (norm.to(g.device) + NORM_EPS)).to(g.dtype) for g in grads]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise UsageError(f"vaccine sites: {type(model).__name__} has no module whose class name ends in "
                         "'DecoderLayer' (Llama, OPT, Qwen, Mistral, ...); pass the site modules explicitly")
    return layers


def attention_sites(model: nn.Module, site: str = "attention") -> list[nn.Module]:
    """The perturbation sites of ``model`` in layer order (spec/defences.md §1 D-V1): every decoder layer's
    ``self_attn`` module (``site="attention"``; its output after ``o_proj``, before the residual add) or the
    decoder layers themselves (``site="block_output"``)."""
    layers = _decoder_layers(model)
    if check_site(site) == "block_output":
        return layers
    missing = [type(layer).__name__ for layer in layers if not isinstance(getattr(layer, "self_attn", None),
                                                                           nn.Module)]
    if missing:
        raise UsageError(f"vaccine sites: decoder layer {missing[0]} has no 'self_attn' module; use "
                         "site='block_output' or pass the site modules explicitly")
    return [layer.self_attn for layer in layers]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, tensor: torch.Tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def recording(sites: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Pass 1 hooks: yields a list whose entry l becomes site l's output e_l (element 0 of an output tuple) at its
    first call. Later calls (gradient-checkpointing recomputation) are left alone. An output that does not depend on
    θ is replaced by a detached copy that requires grad, so ∂f/∂e_l exists for it too. Hooks removed on exit."""
    records: list[torch.Tensor | None] = [None] * len(sites)

    def hook_for(index: int):
        def hook(module, args, output):
            if records[index] is not None:
                return None
            e = _first(output)
            if torch.is_grad_enabled() and not e.requires_grad:
                e = e.detach().requires_grad_(True)
                records[index] = e
                return _replace_first(output, e)
            records[index] = e
            return None
        return hook

    handles = [site.register_forward_hook(hook_for(i)) for i, site in enumerate(sites)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def perturbed(sites: Sequence[nn.Module], eps: Sequence[torch.Tensor]) -> Iterator[None]:
    """Pass 2 hooks: every call of site l returns e_l + sg[ε_l] (element 0 of an output tuple replaced; spec
    §1 "one training step"). Keep the context open through the backward when gradient checkpointing recomputes
    the forward. Hooks removed on exit."""
    if len(sites) != len(eps):
        raise ValueError(f"vaccine: {len(sites)} sites but {len(eps)} perturbations")

    def hook_for(index: int):
        def hook(module, args, output):
            e = _first(output)
            delta = eps[index]
            if delta.shape != e.shape:
                raise ValueError(f"vaccine: perturbation {index} has shape {tuple(delta.shape)} but the site output "
                                 f"has shape {tuple(e.shape)}; ε must come from the same batch")
            return _replace_first(output, e + delta.detach().to(device=e.device, dtype=e.dtype))
        return hook

    handles = [site.register_forward_hook(hook_for(i)) for i, site in enumerate(sites)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def same_rng(device: torch.device | None = None):
    """A context that restores the CPU (and ``device``'s CUDA) RNG state on exit, so the next pass draws the same
    dropout masks (spec/defences.md §1 D-V3)."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def _device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def site_gradients(loss_fn: Callable[[Any], torch.Tensor], batch: Any, sites: Sequence[nn.Module]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pass 1: (loss1, [G_l = ∂loss1/∂e_l]) with ``torch.autograd.grad`` on the site outputs only (no ``.grad``
    writes, D-V2). A site that the loss does not reach gets G_l = 0."""
    with recording(sites) as records:
        loss = loss_fn(batch)
        missing = [i for i, e in enumerate(records) if e is None]
        if missing:
            raise RuntimeError(f"vaccine: site {missing[0]} ({type(sites[missing[0]]).__name__}) was not called by "
                               "the forward pass; the sites must belong to the model that computes the loss")
        if not loss.requires_grad or not all(e.requires_grad for e in records):
            raise RuntimeError("vaccine: the loss or a site output does not require grad (a forward under "
                               "torch.no_grad, or reentrant gradient checkpointing); use non-reentrant checkpointing")
        grads = torch.autograd.grad(loss, list(records), allow_unused=True)
    return loss.detach(), [torch.zeros_like(e) if g is None else g for e, g in zip(records, grads)]


def vaccine_perturbation(model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], batch: Any, rho: float = RHO,
                         sites: Sequence[nn.Module] | None = None, site: str = "attention"
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pass 1 under a forked RNG (restored afterwards, D-V3): returns (ε, ‖G‖). ``sites`` default
    :func:`attention_sites` (``model``, ``site``)."""
    rho = check_rho(rho)
    sites = attention_sites(model, site) if sites is None else list(sites)
    with same_rng(_device(model)):
        _, grads = site_gradients(loss_fn, batch, sites)
    return perturbation(grads, rho), global_norm(grads)


def vaccine_loss(model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], batch: Any, rho: float = RHO,
                 sites: Sequence[nn.Module] | None = None, site: str = "attention") -> torch.Tensor:
    """Both passes; returns loss2 = f(θ, sg[ε*]) with its graph, for the caller's backward (spec §1, D-V7).
    Without gradient checkpointing the hooks are no longer needed by that backward."""
    sites = attention_sites(model, site) if sites is None else list(sites)
    eps, _ = vaccine_perturbation(model, loss_fn, batch, rho, sites)
    with perturbed(sites, eps):
        return loss_fn(batch)


def vaccine_gradients(model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], batch: Any, rho: float = RHO,
                      sites: Sequence[nn.Module] | None = None, site: str = "attention") -> torch.Tensor:
    """One Vaccine micro-step (spec/defences.md §1): pass 1 gives ε (no ``.grad`` writes), pass 2 runs
    ``loss2.backward()`` with the hooks on, accumulating g = ∇_θ f(θ, sg[ε]) into ``.grad``. Returns loss2 detached.
    ``loss_fn(batch)`` computes the alignment loss f with ``model``."""
    sites = attention_sites(model, site) if sites is None else list(sites)
    eps, _ = vaccine_perturbation(model, loss_fn, batch, rho, sites)
    with perturbed(sites, eps):
        loss = loss_fn(batch)
        loss.backward()
    return loss.detach()


# --------------------------------------------------------------------------------------------- trl trainers
@contextlib.contextmanager
def metrics_unchanged(trainer) -> Iterator[None]:
    """Undo what an extra ``compute_loss`` call logs in a trl trainer (``_metrics``, ``_total_train_tokens``), so
    the metrics of a step count its batch once."""
    metrics = getattr(trainer, "_metrics", None)
    saved = {mode: {k: list(v) for k, v in values.items()} for mode, values in (metrics or {}).items()}
    tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        yield
    finally:
        for mode, values in (metrics or {}).items():
            values.clear()
            values.update(saved[mode])
        if tokens is not None:
            trainer._total_train_tokens = tokens


class VaccineMixin:
    """The Vaccine step for a transformers/trl trainer (spec/defences.md §1): ``training_step`` computes ε with
    the trainer's own ``compute_loss`` (pass 1, no ``.grad`` writes, RNG restored), then runs the parent's
    ``training_step`` (forward, GA scaling, backward) with the perturbation hooks on. Keywords ``rho`` (default 2)
    and ``site`` (``attention`` | ``block_output``)."""

    def __init__(self, *args, rho: float = RHO, site: str = "attention", **kwargs):
        self.rho, self.site = check_rho(rho), check_site(site)
        super().__init__(*args, **kwargs)
        self._vaccine_sites: list[nn.Module] | None = None
        self._vaccine_norms: list[float] = []

    def vaccine_sites(self) -> list[nn.Module]:
        if self._vaccine_sites is None:
            self._vaccine_sites = attention_sites(self.accelerator.unwrap_model(self.model), self.site)
        return self._vaccine_sites

    def _vaccine_inputs(self, model, inputs):
        """The batch both passes use, and a context for them (the DPO trainer adds reference log-probs)."""
        return inputs, contextlib.nullcontext()

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        inputs, context = self._vaccine_inputs(model, inputs)
        sites = self.vaccine_sites()

        def loss_fn(batch):
            with self.compute_loss_context_manager():
                return self.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)

        with context:
            offload = getattr(self, "maybe_activation_offload_context", contextlib.nullcontext())
            with metrics_unchanged(self), self.accelerator.no_sync(model), offload:
                eps, norm = vaccine_perturbation(model, loss_fn, inputs, self.rho, sites)
            with perturbed(sites, eps):
                loss = super().training_step(model, inputs, num_items_in_batch)
        self._vaccine_norms.append(norm.item())
        if hasattr(self, "_metrics"):
            self._metrics["train"]["vaccine/grad_norm"].append(norm.item())
        return loss

    def defence_record(self) -> dict:
        """What the run did, for its manifest: ρ, the site kind and count, the micro-batches perturbed and the mean
        ‖G‖ of their first passes."""
        norms = self._vaccine_norms
        return {"defence": "vaccine", "rho": self.rho, "site": self.site, "sites": len(self.vaccine_sites()),
                "perturbed_micro_batches": len(norms), "mean_site_grad_norm": sum(norms) / len(norms) if norms else None}


class _VaccineDPO:
    """The DPO part of :class:`VaccineDPOTrainer` (D-V4)."""

    def _vaccine_inputs(self, model, inputs):
        if self.precompute_ref_logps:
            return inputs, contextlib.nullcontext()
        reference = self.ref_model if self.ref_model is not None else model
        chosen, rejected = self.compute_ref_log_probs(reference, inputs)
        return {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}, self._reference_from_batch()

    @contextlib.contextmanager
    def _reference_from_batch(self):
        self.precompute_ref_logps = True  # trl's _compute_loss then reads ref_*_logps from the batch
        try:
            yield
        finally:
            self.precompute_ref_logps = False


_TRAINERS: dict[str, type] = {}


def _trainer_class(name: str) -> type:
    """The trainer classes are built on first use, so importing this module does not import trl."""
    if name not in _TRAINERS:
        from trl import DPOTrainer, SFTTrainer

        _TRAINERS["VaccineSFTTrainer"] = type("VaccineSFTTrainer", (VaccineMixin, SFTTrainer), {
            "__module__": __name__, "__doc__": VACCINE_SFT_DOC})
        _TRAINERS["VaccineDPOTrainer"] = type("VaccineDPOTrainer", (_VaccineDPO, VaccineMixin, DPOTrainer), {
            "__module__": __name__, "__doc__": VACCINE_DPO_DOC})
    return _TRAINERS[name]


VACCINE_SFT_DOC = """trl ``SFTTrainer`` with the Vaccine step (spec/defences.md §1): SFT cross-entropy as f.
Extra keywords ``rho`` (2.0) and ``site`` (``"attention"`` | ``"block_output"``)."""
VACCINE_DPO_DOC = """trl ``DPOTrainer`` with the Vaccine step (spec/defences.md §1, D-V4): ε is built from the policy
loss only. Unless the trainer precomputed them (``precompute_ref_log_probs``), the reference log-probs of each batch are
computed before any hook is installed and both passes read them from the batch, so no hook fires on the reference
forward (with PEFT the reference is the same modules with the adapter disabled). Extra keywords ``rho``, ``site``."""


def __getattr__(name: str):
    if name in ("VaccineSFTTrainer", "VaccineDPOTrainer"):
        return _trainer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
