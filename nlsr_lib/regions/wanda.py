"""``wanda``: weight magnitude × input-activation norm (spec nlsr.md §4.2; merging.md §3.2; Sun et al. 2023).

For a LoRA matrix ``W`` (rows = its output dim) with inputs ``x`` over the statistic positions of the
calibration set::

    S_ij = |W_ij| · sqrt(c_j),    c_j = Σ_n Σ_{t ∈ resp(n)} x_{n,t,j}²

where ``x`` is the module input for ``lora_A`` and the (unscaled) output of ``lora_A`` for ``lora_B``. The
reference code's ``1/N`` running-mean factor is a constant and does not change any ranking. The mask is
row-wise (:func:`~nlsr_lib.regions.selection.rowwise_keep_mask`, stable tie-break, spec §4.1).

Default: the statistics of the reference model as it is (one hooked forward pass,
:func:`~nlsr_lib.regions.activations.collect_lora_statistics`). ``propagate=True`` reproduces the reference
code: layer by layer, each layer's pruned entries are zeroed before the next layer's inputs are computed
(:func:`~nlsr_lib.regions.activations.layerwise_pass`; the model is restored afterwards).

``wanda_set_difference`` compares these scores on safety and utility data (merging.md §3.2).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .activations import ModuleStats, collect_lora_statistics, layerwise_pass
from .lora import lora_modules
from .registry import register_scorer, register_set_difference
from .selection import rowwise_keep_mask


def _module_scores(name: str, layer: torch.nn.Module, st: ModuleStats) -> dict[str, torch.Tensor]:
    (adapter,) = layer.active_adapters
    out = {}
    for side, linears, sumsq in (("A", layer.lora_A, st.input_sumsq), ("B", layer.lora_B, st.output_sumsq)):
        w = linears[adapter].weight.detach().float().cpu()
        out[f"{name}.lora_{side}.weight"] = w.abs() * sumsq.sqrt().float().cpu()[None, :]
    return out


@register_scorer("wanda", selection="rowwise", options=("positions", "propagate", "mask_sparsity", "tie_rule"))
def wanda_scores(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                 positions: str = "response", propagate: bool = False, mask_sparsity: float | None = None,
                 tie_rule: str = "index", show_progress: bool = True) -> dict[str, torch.Tensor]:
    """``|W_ij|·‖x_j‖`` over the statistic positions (spec §4.2); ``mask_sparsity`` is used by ``propagate``."""
    modules = dict(lora_modules(model))
    scores: dict[str, torch.Tensor] = {}
    if not propagate:
        stats = collect_lora_statistics(model, batches, positions=positions, input_sumsq=True, output_sumsq=True,
                                        show_progress=show_progress, desc="wanda statistics")
        for name, st in stats.items():
            scores.update(_module_scores(name, modules[name], st))
        return scores
    if mask_sparsity is None:
        raise ValueError("wanda with propagate=True prunes each layer before the next: pass mask_sparsity")

    def on_layer(_i: int, stats: dict[str, ModuleStats]) -> bool:
        for name, st in stats.items():
            layer_scores = _module_scores(name, modules[name], st)
            scores.update(layer_scores)
            layer = modules[name]
            (adapter,) = layer.active_adapters
            for side, linears in (("A", layer.lora_A), ("B", layer.lora_B)):
                w = linears[adapter].weight
                keep = rowwise_keep_mask(layer_scores[f"{name}.lora_{side}.weight"], mask_sparsity,
                                         tie_rule=tie_rule, weight=w.detach().cpu())
                w.mul_(keep.to(w.device, w.dtype))
        return True

    layerwise_pass(model, batches, on_layer, positions=positions, input_sumsq=True, output_sumsq=True,
                   show_progress=show_progress, desc="wanda layers")
    return {name: scores[name] for name in _order(modules)}


def _order(modules: Mapping[str, torch.nn.Module]) -> list[str]:
    return [f"{name}.lora_{side}.weight" for name in modules for side in ("A", "B")]


register_set_difference("wanda_set_difference", base="wanda")
