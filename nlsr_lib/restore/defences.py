"""Training-free defences of an attacked adapter, in a registry, and their adapter-directory front ends.

| name                | result (spec/nlsr.md §5, §7; DESIGN.md §6)                                          |
| ------------------- | ----------------------------------------------------------------------------------- |
| ``none``            | the attacked (fine-tuned) adapter unchanged                                         |
| ``nlsr``            | NLSR: similarity on the mask, module selection, neuron-level correction (§5.2–§5.5) |
| ``safelora``        | SafeLoRA projection onto the aligned subspace where the cosine is under τ (§5.6)    |
| ``resta``           | RESTA: the attacked adapter plus γ × the safety vector                              |
| ``aligned_adapter`` | the aligned adapter re-applied wholesale, i.e. returned as it is                    |
| ``random_mask``     | NLSR with a seeded random mask of the given mask's per-tensor density (a control)   |

Each defence takes ``(finetuned, reference, mask, **params)`` as :class:`Adapter` values and returns the
defended :class:`Adapter` and one record per module (name, layer, module_type, similarity, probability,
selected). :func:`defend` / :func:`realign` work on PEFT adapter directories: they read adapters only (never a
base model), write the defended adapter (config, tokenizer files copied from the fine-tuned adapter) and the
records as ``selection.json``, plus ``defence.json`` (name and parameters).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import names
from ..config import RestoreConfig
from ..models import copy_tokenizer_files, lora_scaling, read_adapter, write_adapter
from ..registry import Registry
from ..runs import atomic_write_json
from .baselines import (
    doubled_rank_config, random_mask_like, random_mask_of_density, resta_config, resta_state, safelora_delta_state,
    safelora_state,
)
from .modules import RestoreError, check_mask, check_pair, lora_modules
from .nlsr import module_records, realign_state
from .parallel import kernel_pool
from .selection import strategy_parameters, strategy_params

Tensor = torch.Tensor
SELECTION_FILE = "selection.json"
DEFENCE_FILE = "defence.json"
NLSR_PARAMS = ("strategy", "correction", "similarity", "tau", "prune_rate", "epsilon", "favor", "seed", "layers")


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in memory: state dict (``…lora_{A|B}.weight``) and adapter_config.json contents."""

    state: Mapping[str, Tensor]
    config: Mapping[str, Any]

    @classmethod
    def read(cls, adapter_dir: str | Path) -> "Adapter":
        state, config = read_adapter(adapter_dir)
        return cls(state, config)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.config)


@dataclass(frozen=True)
class Defence:
    """A registered defence: its function and what it consumes."""

    name: str
    fn: Callable[..., tuple[Adapter, list[dict]]]
    needs_reference: bool
    uses_mask: bool


DEFENCES: Registry[Defence] = Registry(names.DEFENCES, make=Defence)


def register_defence(name: str, *, needs_reference: bool = True, uses_mask: bool = False) -> Callable:
    return DEFENCES.register(name, needs_reference=needs_reference, uses_mask=uses_mask)


def _plain_records(adapter: Adapter, selected: bool) -> list[dict]:
    modules = lora_modules(adapter.state)
    return module_records(modules, None, [float(selected)] * len(modules), [selected] * len(modules))


def _same_scaling(finetuned: Adapter, reference: Adapter) -> None:
    if abs(finetuned.scaling - reference.scaling) > 1e-12 * max(1.0, abs(finetuned.scaling)):
        raise RestoreError(f"the fine-tuned and reference adapters have different LoRA scalings κ = lora_alpha/r "
                           f"({finetuned.scaling:g} vs {reference.scaling:g}); transplanted entries would change "
                           "meaning")


@register_defence("none", needs_reference=False)
def no_defence(finetuned: Adapter, reference: Adapter | None, mask=None) -> tuple[Adapter, list[dict]]:
    """The attacked adapter unchanged."""
    return finetuned, _plain_records(finetuned, False)


@register_defence("nlsr", uses_mask=True)
def nlsr_defence(finetuned: Adapter, reference: Adapter, mask=None, *, check_values: bool = True,
                 show_progress: bool | None = None, **params) -> tuple[Adapter, list[dict]]:
    """NLSR (:func:`.nlsr.realign_state`); params: strategy, correction, similarity and the strategy's own."""
    _same_scaling(finetuned, reference)
    state, records = realign_state(finetuned.state, reference.state, mask, check_values=check_values,
                                   show_progress=show_progress, **params)
    return Adapter(state, finetuned.config), records


@register_defence("random_mask", uses_mask=True)
def random_mask_defence(finetuned: Adapter, reference: Adapter, mask=None, *, seed: int = 42,
                        density: float | None = None, check_values: bool = True,
                        show_progress: bool | None = None, **params) -> tuple[Adapter, list[dict]]:
    """NLSR with a random mask: exactly ``mask``'s number of True entries per tensor (or ``density`` when no mask
    is given), drawn with ``torch.Generator(seed)``; ``seed`` also seeds the selection when the strategy draws."""
    if mask is not None:
        check_pair(finetuned.state, reference.state)
        random = random_mask_like(check_mask(mask, finetuned.state), seed=seed)
    elif density is not None:
        random = random_mask_of_density(finetuned.state, density, seed=seed)
    else:
        raise ValueError("random_mask needs a mask (whose density it copies) or a density")
    if "seed" in strategy_parameters(params.get("strategy", "adaptive")):
        params["seed"] = seed
    return nlsr_defence(finetuned, reference, random, check_values=check_values, show_progress=show_progress,
                        **params)


@register_defence("safelora", uses_mask=True)
def safelora_defence(finetuned: Adapter, reference: Adapter, mask=None, *, masked: bool = False,
                     update: str = "adapter", check_values: bool = True, show_progress: bool | None = None,
                     **params) -> tuple[Adapter, list[dict]]:
    """SafeLoRA (:func:`.baselines.safelora_state`) with V from the aligned adapter given as ``reference``;
    params: tau, variant, projection. The mask is used only with ``masked=True`` (the code's mask_scale).
    ``update="finetuning_delta"`` projects only what fine-tuning added (:func:`.baselines.safelora_delta_state`),
    written as a rank-2r adapter."""
    if masked and mask is None:
        raise RestoreError("SafeLoRA with masked=True (restore.safelora.masked) needs a mask (the NLSR mask of the "
                           "safety reference); none was given")
    mask = mask if masked else None
    if update == "finetuning_delta":
        if params.get("variant", "published") != "published":
            raise RestoreError("SafeLoRA update 'finetuning_delta' needs variant 'published'")
        params.pop("variant", None)
        state, records = safelora_delta_state(finetuned.state, reference.state, mask,
                                              reference_scaling=reference.scaling, scaling=finetuned.scaling,
                                              check_values=check_values, show_progress=show_progress, **params)
        return Adapter(state, doubled_rank_config(finetuned.config, "SafeLoRA on the fine-tuning delta")), records
    if update != "adapter":
        raise RestoreError(f"unknown SafeLoRA update {update!r}; allowed: adapter, finetuning_delta")
    state, records = safelora_state(finetuned.state, reference.state, mask, reference_scaling=reference.scaling,
                                    check_values=check_values, show_progress=show_progress, **params)
    return Adapter(state, finetuned.config), records


@register_defence("resta")
def resta_defence(finetuned: Adapter, reference: Adapter, mask=None, *, gamma: float = 0.2, space: str = "weight",
                  check_values: bool = True) -> tuple[Adapter, list[dict]]:
    """RESTA (:func:`.baselines.resta_state`) with the safety vector = ``reference``'s update."""
    state = resta_state(finetuned.state, reference.state, gamma=gamma, space=space,
                        scaling_ratio=reference.scaling / finetuned.scaling, check_values=check_values)
    return Adapter(state, resta_config(finetuned.config, space)), _plain_records(finetuned, True)


@register_defence("aligned_adapter")
def aligned_adapter_defence(finetuned: Adapter, reference: Adapter, mask=None) -> tuple[Adapter, list[dict]]:
    """The aligned adapter re-applied wholesale: ``reference`` returned as it is (its config too)."""
    check_pair(finetuned.state, reference.state, ("fine-tuned adapter", "aligned adapter"))
    return reference, _plain_records(reference, True)


def get_defence(name: str) -> Defence:
    return DEFENCES[name]


def defend_adapter(name: str, finetuned: Adapter, reference: Adapter | None = None,
                   mask: Mapping[str, Tensor] | None = None, **params) -> tuple[Adapter, list[dict]]:
    """Run defence ``name`` in memory. A mask given to a defence that uses none is ignored."""
    defence = get_defence(name)
    if defence.needs_reference and reference is None:
        raise ValueError(f"defence {name!r} needs a reference adapter")
    return defence.fn(finetuned, reference, mask if defence.uses_mask else None, **params)


def load_mask(path: str | Path) -> dict[str, Tensor]:
    """A mask file (DESIGN.md §4: one .safetensors, key → bool tensor; never pickle), read by the one mask loader,
    :func:`nlsr_lib.regions.masks.load_mask` (keys in the adapter form, bool checked); :func:`.modules.check_mask`
    then checks it against the adapter."""
    from ..regions.masks import load_mask as read_mask

    return read_mask(path)[0]


def _distinct(out_dir: Path, *inputs: Path | None) -> None:
    for src in inputs:
        if src is not None and out_dir.resolve() == src.resolve():
            raise ValueError(f"output directory {out_dir} is an input adapter directory; write elsewhere")


def defend(name: str, finetuned_dir: str | Path, out_dir: str | Path, *, reference_dir: str | Path | None = None,
           mask: Mapping[str, Tensor] | str | Path | None = None, **params) -> list[dict]:
    """Defence ``name`` on adapter directories: write the defended PEFT adapter to ``out_dir`` with
    ``selection.json`` (the records, returned) and ``defence.json``. ``mask``: dict, mask file or None."""
    finetuned_dir, out_dir = Path(finetuned_dir), Path(out_dir)
    reference_dir = None if reference_dir is None else Path(reference_dir)
    _distinct(out_dir, finetuned_dir, reference_dir)
    defence = get_defence(name)
    if isinstance(mask, (str, Path)):
        mask = load_mask(mask)
    dirs = [finetuned_dir] + ([reference_dir] if reference_dir is not None and defence.needs_reference else [])
    with kernel_pool() as pool:  # both files at once, single-threaded kernels (see .parallel)
        adapters = list(pool.map(Adapter.read, dirs))
    finetuned, reference = adapters[0], (adapters[1] if len(adapters) > 1 else None)
    if "check_values" in _parameters(defence.fn):
        params.setdefault("check_values", False)  # read_adapter has refused NaN/inf already
    adapter, records = defend_adapter(name, finetuned, reference, mask, **params)
    write_adapter(out_dir, adapter.state, adapter.config)
    copy_tokenizer_files(finetuned_dir, out_dir)
    atomic_write_json(out_dir / SELECTION_FILE, records)
    atomic_write_json(out_dir / DEFENCE_FILE, {
        "defence": name, "params": {k: v for k, v in params.items() if k not in ("check_values", "show_progress")},
        "finetuned": str(finetuned_dir), "reference": None if reference_dir is None else str(reference_dir),
        "selected": sum(r["selected"] for r in records), "modules": len(records)})
    return records


def _parameters(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def realign(finetuned_dir: str | Path, reference_dir: str | Path, mask: Mapping[str, Tensor] | str | Path | None,
            out_dir: str | Path, *, strategy: str = "adaptive", seed: int = 42, **params) -> list[dict]:
    """NLSR on adapter directories (spec §5; output as §11): the realigned adapter and its records.

    ``mask=None`` means every entry is safety-critical. ``seed`` goes to the strategies that draw; the other
    params are ``correction``, ``similarity`` and the strategy's own (``tau``; ``prune_rate``, ``epsilon``,
    ``favor``; ``layers``)."""
    chosen = strategy_params(strategy, {"seed": seed, **params})
    other = {k: v for k, v in params.items() if k not in chosen}
    return defend("nlsr", finetuned_dir, out_dir, reference_dir=reference_dir, mask=mask, strategy=strategy,
                  **chosen, **other)


def defence_params(cfg: RestoreConfig, name: str) -> dict[str, Any]:
    """The parameters of defence ``name`` from the ``restore:`` config section (:class:`RestoreConfig`)."""
    get_defence(name)
    if name in ("nlsr", "random_mask"):
        fields = {k: getattr(cfg, k) for k in NLSR_PARAMS}
        fields["layers"] = tuple(fields["layers"])
        out = {"strategy": cfg.strategy, "correction": cfg.correction, "similarity": cfg.similarity,
               **strategy_params(cfg.strategy, fields)}
        if name == "random_mask":
            out["seed"] = cfg.seed
        return out
    if name == "safelora":
        s = cfg.safelora
        return {"tau": s.tau, "variant": s.variant, "projection": s.projection, "masked": s.masked,
                "update": s.update}
    if name == "resta":
        return {"gamma": cfg.resta.gamma, "space": cfg.resta.space}
    return {}
