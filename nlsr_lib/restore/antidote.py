"""Antidote: one-shot pruning of the fine-tuned LoRA factors by Wanda scores on harmful data (spec/defences.md §4).

For every LoRA factor ``W ∈ R^{d_out×d_in}`` of the served (fine-tuned) adapter, with a calibration set C of
harmful sequences (prompt + harmful response + EOS, every position counts, D-A4)::

    s_j  = (1/|C|) · Σ_{c∈C} Σ_{t∈c} x_{c,t,j}²       x = module input for lora_A; z = A·x (before κ) for lora_B
    S_ij = |W_ij| · sqrt(s_j)
    per row i: the k = ⌊d_in·(1 − δ)⌋ lowest scores (stable ascending sort) get M_ij = 0, the rest M_ij = 1
    W ← W ⊙ (1 − M)                                     (M = True marks a "harmful" weight)

δ = ``dense_ratio``, the fraction of each row marked harmful. Defaults follow the authors' code (D-A1..D-A4):

* ``dense_ratio = 0.1`` (Ant@26e2ade train.py default and the SST-2 script ``antidote_poison_ratio.sh``); the
  AG News, GSM8K and model-study scripts use 0.05, the lr/epoch studies 0.2 (§4 hyperparameters).
* ``group = "row"``: one comparison group per output row, as in Wanda (D-A2); ``"matrix"`` = one top-k over
  the whole matrix, ``k = ⌊d_out·d_in·(1 − δ)⌋``.
* Counts are exact on δ's decimal value (``Fraction(repr(δ))``), so ``10·(1 − 0.9)`` is 1, not 0.999… (D-A3);
  ties keep the lower (flat) index. Since ``⌊n(1−δ)⌋ < n``, every row (matrix) has at least one marked weight;
  a factor with one column (``lora_B`` at r = 1) has all of its weights marked.
* Statistics: one ``no_grad`` pass with hooks on all factors (:func:`~nlsr_lib.regions.activations.
  collect_lora_statistics`), equal to the code's layer-by-layer loop because no mask is applied before the next
  layer's statistics are gathered (§4 "What is pruned"). Padding positions are masked (D-A4).
* Pruned tensors: the LoRA factors of the served adapter (D-A1). In the NLSR harness that adapter is the aligned
  adapter trained further, so pruning also removes aligned components; the records say how much of each factor
  went. The option ``target: merged_delta`` (prune the dense κ·B·A) is not implemented here.
* The calibration data must be disjoint from the attack's harmful rows and the evaluation prompts (D-A5); the
  caller chooses them (the code: BeaverTails ``30k_train`` unsafe rows 5000 < i < 7000).

:func:`antidote` returns the pruned adapter state dict, the masks (adapter key → bool, True = harmful = zeroed)
and one record per factor; :func:`save_antidote` writes them (PEFT adapter, safetensors mask, JSON records).
The model is never modified.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ..models import write_adapter
from ..regions.activations import collect_lora_statistics
from ..regions.lora import adapter_key, lora_matrices, lora_modules, normalize_key, parse_key
from ..regions.masks import save_mask
from ..regions.selection import _stable_keep_last, _threshold_keep
from ..runs import atomic_write_json

Tensor = torch.Tensor
DENSE_RATIO = 0.1
"""δ default: Ant@26e2ade train.py and the SST-2 script; 0.05 for AG News / GSM8K / model study; 0.2 lr/epochs."""
GROUPS = ("row", "matrix")
MASK_FILE = "antidote_mask.safetensors"
SELECTION_FILE = "selection.json"
DEFENCE_FILE = "defence.json"


# --------------------------------------------------------------------------------------------- counts
def _check_dense_ratio(dense_ratio: Any) -> Fraction:
    """δ as an exact fraction (its decimal value for a float); ValueError outside (0, 1)."""
    if isinstance(dense_ratio, bool) or not isinstance(dense_ratio, numbers.Real):
        raise ValueError(f"dense_ratio δ must be a number in (0, 1), got {dense_ratio!r}")
    if isinstance(dense_ratio, Fraction):
        exact = dense_ratio
    elif math.isfinite(float(dense_ratio)):
        exact = Fraction(repr(float(dense_ratio)))
    else:
        exact = Fraction(-1)
    if not 0 < exact < 1:
        raise ValueError(f"dense_ratio δ (fraction of each row marked harmful) must be in (0, 1) exclusive, "
                         f"got {dense_ratio!r}; the spec default is {DENSE_RATIO} (0.05 for AG News/GSM8K)")
    return exact


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown Antidote comparison group {group!r}; allowed: {', '.join(GROUPS)}")


def kept_count(n: int, dense_ratio: float | Fraction = DENSE_RATIO) -> int:
    """``k = ⌊n·(1 − δ)⌋`` entries kept (not marked) out of ``n``, exact on δ's decimal value (spec §4, D-A3).

    >>> kept_count(256, 0.1), kept_count(4096, 0.1), kept_count(14336, 0.1), kept_count(10, 0.9)
    (230, 3686, 12902, 1)
    """
    exact = _check_dense_ratio(dense_ratio)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of entries per comparison group must be an integer >= 1, got {n!r}")
    return math.floor(n * (1 - exact))


# --------------------------------------------------------------------------------------------- statistics
def _lora_modules(model: torch.nn.Module) -> list:
    try:
        return lora_modules(model)
    except ValueError as exc:
        raise ValueError("Antidote needs a model with LoRA factors: load the fine-tuned adapter as a peft.PeftModel "
                         f"(on the base with the alignment adapter merged) ({exc})") from exc


def _right_padded(mask: Tensor) -> bool:
    """True iff every row of the 0/1 attention mask is ones then zeros (so positions are unshifted)."""
    m = mask.to(torch.int64)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _calibration_batch(batch: Any, index: int) -> dict[str, Tensor]:
    """``{input_ids, attention_mask, labels}`` with labels = 0 on every real token and −100 on padding, so the
    statistic positions of :func:`collect_lora_statistics` are all non-padding positions (D-A4)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"calibration batch {index} must be a mapping with 'input_ids' (and 'attention_mask' when "
                         f"padded), got {type(batch).__name__}")
    ids = torch.as_tensor(batch["input_ids"])
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"calibration batch {index}: input_ids must be (batch, seq) with batch, seq >= 1, "
                         f"got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    if not bool((mask.sum(1) > 0).all()):
        raise ValueError(f"calibration batch {index} has a sequence without any token (attention_mask all 0)")
    if not _right_padded(mask):
        raise ValueError(f"calibration batch {index} is not right-padded: left padding shifts the position ids of "
                         "the real tokens and changes their activations; pad on the right (or use batch size 1)")
    labels = torch.where(mask.bool(), torch.zeros_like(ids), torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def harmful_input_statistics(model: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]], *,
                             show_progress: bool = False) -> dict[str, Tensor]:
    """``s_j = (1/|C|)·Σ_c Σ_t x_{c,t,j}²`` for every LoRA factor (spec/defences.md §4, D-A4), keyed by adapter key.

    ``…lora_A.weight`` → s over the module input x (d_in); ``…lora_B.weight`` → s over z = A·x before κ (r).
    One ``no_grad`` forward per batch in eval mode with hooks on all factors (nlsr_lib.regions.activations);
    every non-padding position counts (prompt included); |C| = the number of sequences. Batches: mappings with
    ``input_ids`` and, when padded, ``attention_mask`` (right padding); labels are ignored. fp32 result
    (accumulated in fp64)."""
    modules = _lora_modules(model)
    prepared = [_calibration_batch(b, i) for i, b in enumerate(batches)]
    if not prepared:
        raise ValueError("Antidote needs calibration data: no batches were given (harmful QA pairs disjoint from the "
                         "attack rows and the evaluation prompts, spec/defences.md §4 D-A5)")
    n_sequences = sum(int(b["input_ids"].shape[0]) for b in prepared)
    stats = collect_lora_statistics(model, prepared, positions="response", input_sumsq=True, output_sumsq=True,
                                    show_progress=show_progress, desc="antidote statistics")
    out: dict[str, Tensor] = {}
    for name, _ in modules:
        st = stats[name]
        if st.input_sumsq is None:
            raise ValueError(f"LoRA module {name} saw no input in the decoder pass (a LoRA outside the decoder "
                             "layers, e.g. on lm_head?); Antidote prunes the decoder layers' LoRA factors")
        out[adapter_key(name, "A")] = (st.input_sumsq / n_sequences).float().cpu()
        out[adapter_key(name, "B")] = (st.output_sumsq / n_sequences).float().cpu()
    return out


# --------------------------------------------------------------------------------------------- scores and masks
def antidote_scores(weight: Tensor, s: Tensor) -> Tensor:
    """``S_ij = |W_ij|·sqrt(s_j)``, s broadcast over the rows (spec/defences.md §4); fp32 on the weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"Antidote scores a 2-D LoRA factor, got a weight of shape {tuple(weight.shape)}")
    if s.dim() != 1 or s.shape[0] != weight.shape[1]:
        raise ValueError(f"input statistics of shape {tuple(s.shape)} do not match the weight's d_in = "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("input statistics must be finite sums of squares (>= 0)")
    return weight.detach().float().abs() * s.to(weight.device).float().sqrt()[None, :]


def harmful_mask(scores: Tensor, dense_ratio: float | Fraction = DENSE_RATIO, *, group: str = "row") -> Tensor:
    """Bool mask M, True = harmful (spec/defences.md §4, D-A2, D-A3).

    ``row``: in every row the ``⌊d_in·(1 − δ)⌋`` lowest scores are kept (stable ascending sort: among equal scores
    the lower column index is kept) and the other ``d_in − k`` marked. ``matrix``: the same over the flattened
    matrix with ``k = ⌊d_out·d_in·(1 − δ)⌋`` (ties: the lower flat index is kept).

    >>> harmful_mask(torch.tensor([[1., 3.162278, .790569], [3., .158114, 1.581139]]), 0.5).int().tolist()
    [[1, 1, 0], [1, 0, 1]]
    """
    _check_dense_ratio(dense_ratio)
    _check_group(group)
    if scores.dim() != 2:
        raise ValueError(f"Antidote masks a 2-D score matrix, got shape {tuple(scores.shape)}")
    scores = scores.detach().float()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("Antidote scores contain NaN or inf; check the calibration statistics and the weights")
    if group == "row":
        return _stable_keep_last(scores, kept_count(scores.shape[1], dense_ratio))
    flat = scores.reshape(-1)
    return _threshold_keep(flat, kept_count(flat.numel(), dense_ratio)).reshape(scores.shape)


def prune_adapter(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``W ← W ⊙ (1 − M)`` for every masked key (spec/defences.md §4); other keys and dtypes are unchanged."""
    out = dict(state)
    for key, mask in masks.items():
        norm = normalize_key(key)
        if norm not in state:
            raise ValueError(f"mask key {key!r} names no tensor of the adapter state dict (it has {len(state)} keys, "
                             f"e.g. {next(iter(state), None)!r})")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask {key}: expected a bool tensor (True = harmful), got {mask.dtype}")
        if tuple(mask.shape) != tuple(state[norm].shape):
            raise ValueError(f"mask {key} has shape {tuple(mask.shape)} but the weight has {tuple(state[norm].shape)}")
        out[norm] = state[norm].masked_fill(mask.to(state[norm].device), 0)
    return out


def antidote_records(masks: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """One record per factor (JSON-ready): key, layer, module, matrix (A/B), rows, cols, marked, total, fraction."""
    out = []
    for key, mask in masks.items():
        marked, total = int(mask.sum()), mask.numel()
        out.append({"key": key, **parse_key(key), "rows": int(mask.shape[0]), "cols": int(mask.shape[1]),
                    "marked": marked, "total": total, "fraction": marked / total})
    return out


# --------------------------------------------------------------------------------------------- one-shot transform
def antidote(model: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]], *,
             dense_ratio: float | Fraction = DENSE_RATIO, group: str = "row", show_progress: bool = False,
             ) -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict[str, Any]]]:
    """Antidote's one-shot transform (spec/defences.md §4): ``(pruned adapter state dict, masks, records)``.

    ``model``: the fine-tuned model as a PeftModel (base + merged alignment adapter + the fine-tuned adapter
    active); ``batches``: the harmful re-alignment set (see :func:`harmful_input_statistics`). The state dict is
    the active adapter's (keys ``…lora_{A|B}.weight``, CPU, the weights' dtype); masks are bool, True = zeroed.
    The model itself is not modified."""
    _check_dense_ratio(dense_ratio)
    _check_group(group)
    s = harmful_input_statistics(model, batches, show_progress=show_progress)
    state = {m.key: m.weight.detach().cpu().clone() for m in lora_matrices(model)}
    masks = {key: harmful_mask(antidote_scores(w, s[key]), dense_ratio, group=group) for key, w in state.items()}
    return prune_adapter(state, masks), masks, antidote_records(masks)


def save_antidote(out_dir: str | Path, state: Mapping[str, Tensor], config: Mapping[str, Any],
                  masks: Mapping[str, Tensor], records: list[dict[str, Any]], *,
                  dense_ratio: float | Fraction = DENSE_RATIO, group: str = "row") -> Path:
    """Write the pruned PEFT adapter (``config`` = the fine-tuned adapter's adapter_config.json), the mask as
    safetensors (``antidote_mask.safetensors``, True = harmful; never pickle), ``selection.json`` (records) and
    ``defence.json`` (name, parameters, totals) to ``out_dir``."""
    out_dir = Path(out_dir)
    write_adapter(out_dir, state, config)
    ratio = str(dense_ratio) if isinstance(dense_ratio, Fraction) else float(dense_ratio)
    save_mask(out_dir / MASK_FILE, masks, {"scorer": "antidote", "meaning": "True = harmful (zeroed)",
                                           "dense_ratio": ratio, "group": group})
    atomic_write_json(out_dir / SELECTION_FILE, records)
    marked, total = sum(r["marked"] for r in records), sum(r["total"] for r in records)
    atomic_write_json(out_dir / DEFENCE_FILE, {"defence": "antidote", "params": {"dense_ratio": ratio, "group": group},
                                               "marked": marked, "total": total,
                                               "fraction": marked / total if total else 0.0})
    return out_dir


__all__ = ["DENSE_RATIO", "GROUPS", "antidote", "antidote_records", "antidote_scores", "harmful_input_statistics",
           "harmful_mask", "kept_count", "prune_adapter", "save_antidote"]
