"""Training-free baselines on adapter state dicts (spec/nlsr.md §5.6, §7; spec/somf.md §3.5; DESIGN.md §6).

**SafeLoRA** (Hsu et al. 2024) projects the fine-tuned LoRA update ΔW = κ·B·A of a module onto the alignment
subspace given by V = W_aligned − W_unaligned, and keeps the projection where it changes the update a lot:
``C = V Vᵀ / ‖V‖_F`` (the published code's approximation; ``projection="exact"``: the orthogonal projector
V(VᵀV)⁺Vᵀ onto col V), project iff ``cos(vec(C ΔW), vec ΔW) ≤ τ``, and then ``B ← C B``.
In this adapter-only setting the aligned model is W_sft + the aligned adapter and the unaligned one is W_sft
(the base every adapter here lives on), so **V = κ̂·B̂·Â, the reference adapter's own update** (pass the plain
aligned adapter as the reference, spec §7). Everything is exact in LoRA factors without a d_out×d_out or
d_out×d_in matrix: ``C B = κ̂² B̂ (ÂÂᵀ)(B̂ᵀB) / ‖V‖_F`` with ``‖V‖_F = κ̂·sqrt(sum((B̂ᵀB̂)⊙(ÂÂᵀ)))``; the
exact projector is ``Q Qᵀ`` with Q an orthonormal basis of col(B̂Â) from a QR of B̂ and an r×r eigenproblem.
The result is written back as LoRA factors exactly: A is kept and B replaced by CB, since κ(CB)A = C·ΔW.

``variant="nlsr_code"`` reproduces the NLSR repository's variant (spec §5.6, §9.8): V = Âᵀ B̂ᵀ (the transposed
reference update, no κ), C = V Vᵀ / ‖V‖_F (d_in×d_in, input side), select iff cos(vec(C D), vec D) < τ with
D = AᵀBᵀ, then ``A ← A C`` (B unchanged) — again exact: ``A C = (AÂᵀ)(B̂ᵀB̂)Â / ‖V‖_F``.
With a mask (the code's ``mask_scale``) the reference factors are masked before V is formed (both variants).

**RESTA** (Bhardwaj et al. 2024) adds γ × the safety vector. ``space="weight"`` (default, the paper):
ΔW' = κ·B·A + γ·κ̂·B̂·Â, written exactly as a rank-2r LoRA ``B' = [B, γ(κ̂/κ)B̂]``, ``A' = [A; Â]`` with the
adapter config's r doubled and lora_alpha set so κ is unchanged. ``space="factor"`` reproduces the SOMF code
(spec/somf.md §3.5): ``A' = A + γÂ``, ``B' = B + γB̂`` (same rank; the update gains cross terms).

**Random-mask control**: a seeded random mask with exactly the same number of True entries as a given mask in
every tensor (so the same density per tensor and overall), to be used in NLSR in place of the real mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .modules import RestoreError, check_finite, check_mask, check_pair
from .nlsr import module_records
from .parallel import map_modules
from .similarity import cosine, frobenius_inner, masked

Tensor = torch.Tensor
SAFELORA_VARIANTS = ("published", "nlsr_code")
SAFELORA_PROJECTIONS = ("approx", "exact")
RESTA_SPACES = ("weight", "factor")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------- SafeLoRA
def _aligned_basis(a_ref: Tensor, b_ref: Tensor) -> Tensor:
    """An orthonormal basis (fp64, d_out×k) of col(B̂Â): QR of B̂, then the eigenvectors of (RÂ)(RÂ)ᵀ whose
    singular values pass the usual rank tolerance σ > σ_max·max(d_out, d_in)·eps(fp32)."""
    q, r = torch.linalg.qr(b_ref.double())
    a64 = a_ref.double()
    evals, vecs = torch.linalg.eigh(r @ (a64 @ a64.T) @ r.T)
    top = float(evals.max().clamp_min(0.0))
    tol = top * (max(b_ref.shape[0], a_ref.shape[1]) * torch.finfo(torch.float32).eps) ** 2
    return q @ vecs[:, evals > tol] if top > 0 else q[:, :0]


def _projected_b(b: Tensor, a_ref: Tensor, b_ref: Tensor, kappa_ref: float, projection: str) -> Tensor:
    """C·B (fp32, d_out×r) for the published SafeLoRA with V = κ̂·B̂·Â; C = 0 when V = 0."""
    if projection == "exact":
        basis = _aligned_basis(a_ref, b_ref)
        return (basis @ (basis.T @ b.double())).float()
    gram_a_ref = a_ref @ a_ref.T
    norm_v = kappa_ref * math.sqrt(max(float(((b_ref.T @ b_ref) * gram_a_ref).sum(dtype=torch.float64)), 0.0))
    if norm_v == 0.0:
        return torch.zeros_like(b)
    return (kappa_ref ** 2 / norm_v) * (b_ref @ (gram_a_ref @ (b_ref.T @ b)))


def _projected_a(a: Tensor, a_ref: Tensor, b_ref: Tensor) -> Tensor:
    """A·C (fp32, r×d_in) for the NLSR code's variant, C = VVᵀ/‖V‖_F with V = ÂᵀB̂ᵀ; C = 0 when V = 0."""
    gram_b_ref = b_ref.T @ b_ref
    norm_v = math.sqrt(max(float((gram_b_ref * (a_ref @ a_ref.T)).sum(dtype=torch.float64)), 0.0))
    if norm_v == 0.0:
        return torch.zeros_like(a)
    return ((a @ a_ref.T) @ gram_b_ref @ a_ref) / norm_v


def safelora_module(a: Tensor, b: Tensor, a_ref: Tensor, b_ref: Tensor, *, variant: str = "published",
                    projection: str = "approx", reference_scaling: float = 1.0) -> tuple[float, Tensor, Tensor]:
    """(cos(vec(C ΔW), vec ΔW), projected A, projected B) of one module, factors in fp32; the caller keeps the
    projection only where the cosine is under τ. ``reference_scaling`` = κ̂ of the reference adapter."""
    a, b, a_ref, b_ref = a.float(), b.float(), a_ref.float(), b_ref.float()
    if variant == "published":
        b_new, a_new = _projected_b(b, a_ref, b_ref, reference_scaling, projection), a
    else:
        a_new, b_new = _projected_a(a, a_ref, b_ref), b
    cos = cosine(frobenius_inner(b_new, a_new, b, a), frobenius_inner(b_new, a_new, b_new, a_new),
                 frobenius_inner(b, a, b, a))
    return cos, a_new, b_new


def safelora_state(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                   mask: Mapping[str, Tensor] | None = None, *, reference_scaling: float, tau: float = 0.6,
                   variant: str = "published", projection: str = "approx", check_values: bool = True,
                   show_progress: bool | None = None) -> tuple[dict[str, Tensor], list[dict]]:
    """SafeLoRA on state dicts: (projected state, records whose ``similarity`` is cos(vec(C ΔW), vec ΔW)).

    ``reference`` is the aligned adapter (V = its update, see the module docstring); ``mask`` (optional) masks
    the reference factors first. ``published`` projects where cos ≤ τ (as its code), ``nlsr_code`` where cos < τ.
    """
    _choice("SafeLoRA variant", variant, SAFELORA_VARIANTS)
    _choice("SafeLoRA projection", projection, SAFELORA_PROJECTIONS)
    if variant == "nlsr_code" and projection != "approx":
        raise ValueError("SafeLoRA variant 'nlsr_code' has only the approximate projection C = VVᵀ/‖V‖_F")
    modules = check_pair(finetuned, reference, ("fine-tuned adapter", "aligned adapter"))
    mask = None if mask is None else check_mask(mask, finetuned)
    if check_values:
        check_finite(finetuned, "fine-tuned adapter")
        check_finite(reference, "aligned adapter")
    target = "key_b" if variant == "published" else "key_a"

    def one(m) -> tuple[float, bool, Tensor | None]:
        a_ref = masked(reference[m.key_a], None if mask is None else mask[m.key_a])
        b_ref = masked(reference[m.key_b], None if mask is None else mask[m.key_b])
        cos, a_new, b_new = safelora_module(finetuned[m.key_a], finetuned[m.key_b], a_ref, b_ref, variant=variant,
                                            projection=projection, reference_scaling=reference_scaling)
        chosen = cos <= tau if variant == "published" else cos < tau
        return cos, chosen, ((b_new if variant == "published" else a_new) if chosen else None)

    results = map_modules(one, modules, f"SafeLoRA ({variant})", show_progress)
    out = dict(finetuned)
    for m, (_, chosen, projected) in zip(modules, results):
        if chosen:
            key = getattr(m, target)
            out[key] = projected.to(finetuned[key].dtype)
    cosines, selected = [r[0] for r in results], [r[1] for r in results]
    return out, module_records(modules, cosines, [float(s) for s in selected], selected)


def safelora_delta_state(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                         mask: Mapping[str, Tensor] | None = None, *, reference_scaling: float, scaling: float,
                         tau: float = 0.6, projection: str = "approx", check_values: bool = True,
                         show_progress: bool | None = None) -> tuple[dict[str, Tensor], list[dict]]:
    """SafeLoRA on what fine-tuning added (``safelora.update: finetuning_delta``), for adapters that continue the
    aligned one. With ``ΔW = κBA − κ̂B̂Â = κ[B, −sB̂][A; Â]`` (``s = κ̂/κ``) and C from V = κ̂B̂Â as in
    :func:`safelora_state`, a module with ``cos(vec(CΔW), vec ΔW) ≤ τ`` becomes ``κ̂B̂Â + CΔW``, every other
    module keeps ``κBA``. Written exactly as a rank-2r LoRA (κ unchanged): projected
    ``B' = [CB, s(B̂ − CB̂)]``, others ``B' = [B, 0]``; ``A' = [A; Â]``."""
    _choice("SafeLoRA projection", projection, SAFELORA_PROJECTIONS)
    modules = check_pair(finetuned, reference, ("fine-tuned adapter", "aligned adapter"))
    mask = None if mask is None else check_mask(mask, finetuned)
    if check_values:
        check_finite(finetuned, "fine-tuned adapter")
        check_finite(reference, "aligned adapter")
    s = reference_scaling / scaling

    def one(m) -> tuple[float, bool, tuple[Tensor, Tensor]]:
        a, b = finetuned[m.key_a].float(), finetuned[m.key_b].float()
        a_ref = masked(reference[m.key_a], None if mask is None else mask[m.key_a]).float()
        b_ref = masked(reference[m.key_b], None if mask is None else mask[m.key_b]).float()
        a_hat, b_hat = reference[m.key_a].float(), reference[m.key_b].float()
        cb = _projected_b(b, a_ref, b_ref, reference_scaling, projection)
        cb_hat = _projected_b(b_hat, a_ref, b_ref, reference_scaling, projection)
        b_delta, a_delta = torch.cat([b, -s * b_hat], dim=1), torch.cat([a, a_hat], dim=0)
        b_proj = torch.cat([cb, -s * cb_hat], dim=1)
        cos = cosine(frobenius_inner(b_proj, a_delta, b_delta, a_delta),
                     frobenius_inner(b_proj, a_delta, b_proj, a_delta),
                     frobenius_inner(b_delta, a_delta, b_delta, a_delta))
        chosen = cos <= tau
        b_new = torch.cat([cb, s * (b_hat - cb_hat)], dim=1) if chosen else torch.cat([b, torch.zeros_like(b_hat)], 1)
        return cos, chosen, (a_delta, b_new)

    results = map_modules(one, modules, "SafeLoRA (fine-tuning delta)", show_progress)
    out = {}
    for m, (_, _, (a_new, b_new)) in zip(modules, results):
        out[m.key_a] = a_new.to(finetuned[m.key_a].dtype)
        out[m.key_b] = b_new.to(finetuned[m.key_b].dtype)
    cosines, selected = [r[0] for r in results], [r[1] for r in results]
    return out, module_records(modules, cosines, [float(x) for x in selected], selected)


# --------------------------------------------------------------------------------------------- RESTA
def resta_state(finetuned: Mapping[str, Tensor], reference: Mapping[str, Tensor], *, gamma: float = 0.2,
                space: str = "weight", scaling_ratio: float = 1.0, check_values: bool = True) -> dict[str, Tensor]:
    """RESTA: θ + γ·v_safe with v_safe = the safety adapter's update (see the module docstring).

    ``scaling_ratio`` = κ̂/κ (safety adapter's LoRA scaling over the fine-tuned one's), used by ``weight``."""
    _choice("RESTA space", space, RESTA_SPACES)
    modules = check_pair(finetuned, reference, ("fine-tuned adapter", "safety adapter"))
    if check_values:
        check_finite(finetuned, "fine-tuned adapter")
        check_finite(reference, "safety adapter")
    out = {}
    for m in modules:
        a, b, a_ref, b_ref = (t.float() for t in (finetuned[m.key_a], finetuned[m.key_b],
                                                  reference[m.key_a], reference[m.key_b]))
        if space == "factor":
            a_new, b_new = a + gamma * a_ref, b + gamma * b_ref
        else:
            a_new, b_new = torch.cat([a, a_ref], dim=0), torch.cat([b, (gamma * scaling_ratio) * b_ref], dim=1)
        out[m.key_a] = a_new.to(finetuned[m.key_a].dtype)
        out[m.key_b] = b_new.to(finetuned[m.key_b].dtype)
    return out


def resta_config(config: Mapping, space: str = "weight") -> dict:
    """The adapter config of a RESTA result: unchanged for ``factor``; for ``weight`` r doubled and lora_alpha
    set so that κ = lora_alpha/r (or /sqrt(r) with rsLoRA) is unchanged."""
    _choice("RESTA space", space, RESTA_SPACES)
    if space == "factor":
        return dict(config)
    return doubled_rank_config(config, "RESTA in weight space")


def doubled_rank_config(config: Mapping, what: str) -> dict:
    """``config`` with r doubled and lora_alpha set so that κ = lora_alpha/r (or /sqrt(r)) is unchanged."""
    out = dict(config)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise RestoreError(f"{what} doubles the rank; adapters with rank_pattern/alpha_pattern are not supported")
    r = int(config["r"])
    kappa = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    out["r"] = 2 * r
    alpha = kappa * (math.sqrt(2 * r) if config.get("use_rslora") else 2 * r)
    out["lora_alpha"] = int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha
    return out


# --------------------------------------------------------------------------------------------- random mask
def _random_bool(shape: torch.Size, count: int, generator: torch.Generator) -> Tensor:
    n = math.prod(shape)
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=generator)[:count]] = True
    return out.reshape(shape)


def random_mask_like(mask: Mapping[str, Tensor], *, seed: int = 42) -> dict[str, Tensor]:
    """A uniformly random mask with exactly as many True entries as ``mask`` in every tensor; one explicit
    ``torch.Generator(seed)`` consumed in sorted key order, so the result depends only on (mask counts, seed)."""
    g = torch.Generator().manual_seed(seed)
    return {k: _random_bool(mask[k].shape, int(mask[k].sum()), g) for k in sorted(mask)}


def random_mask_of_density(state: Mapping[str, Tensor], density: float, *, seed: int = 42) -> dict[str, Tensor]:
    """A uniformly random mask for ``state`` with round(density·n) True entries in each tensor."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"mask density must be in [0, 1], got {density}")
    g = torch.Generator().manual_seed(seed)
    return {k: _random_bool(state[k].shape, round(density * state[k].numel()), g) for k in sorted(state)}
