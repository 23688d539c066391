"""From scores to boolean masks: how many entries to keep and which (spec nlsr.md §4.1, §4.6, §9.12; DESIGN §6).

True = kept = safety-critical. Three comparison groups:

* **row-wise** (:func:`rowwise_keep_mask`; wanda, snip, preference_snip, random): in every row of the score
  matrix (rows = the matrix's output dim) sort ascending with a **stable** sort and prune the first
  ``⌊cols·s⌋`` entries, so among equal scores the lower column index is pruned first (spec §4.1, §10).
* **per matrix** (:func:`magnitude_keep_mask`; low_rank on ``|W'|``): keep the top ``⌈(1−s)·n⌉`` entries of the
  whole matrix, exact count, ties broken by index the same way (the lower flat index is pruned first); the
  threshold is found with ``kthvalue`` in O(n), not by a full sort (DESIGN §5).
* **set difference** (:func:`set_difference_mask`; merging.md §3.2): top-⌊q·n⌋ safety entries minus the
  top-⌊p·n⌋ utility entries, over all entries of the matrix.

Counts are exact in decimal (:mod:`nlsr_lib.counts`): ``s`` is read as the decimal the user wrote, so the kept
count :func:`~nlsr_lib.counts.kept_by_sparsity` ``= n − ⌊n·s⌋ = ⌈(1−s)·n⌉`` holds exactly (``0.57·100`` is 57,
not 56.999…).

``tie_rule="reference"`` reproduces the reference code instead (DESIGN §6 "magnitude mask"):
row-wise prunes ``int(cols·s)`` (float product) per row and also prunes entries whose weight is already exactly 0
(``get_mask`` reads the mask back as ``weight == 0``); per matrix it prunes ``|w| ≤ sorted[int(n·s)]`` (one extra
entry plus all ties) and, when that threshold is 0, prunes each zero with probability ``s / frac_zero``.
"""

from __future__ import annotations

import torch

from ..counts import floor_share, kept_by_sparsity

TIE_RULES = ("index", "reference")


def _check_ratio(name: str, s: float, *, allow_one: bool = False) -> None:
    if not (0.0 <= s <= 1.0) or (s == 1.0 and not allow_one):
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {s!r}")


def _check_tie_rule(tie_rule: str) -> None:
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie_rule {tie_rule!r}; allowed: {', '.join(TIE_RULES)}")


def _stable_keep_last(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Along the last dim: stable ascending sort, the first ``n_prune`` are pruned, the rest kept."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, order[..., n_prune:], True)
    return keep


def _threshold_keep(flat: torch.Tensor, n_prune: int) -> torch.Tensor:
    """The same selection as :func:`_stable_keep_last` on a 1-D tensor in O(n): ``kthvalue`` finds the threshold,
    and among the entries equal to it the lowest indices are pruned (DESIGN §5: threshold, not a full sort)."""
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune == 0:
        return keep
    thr = flat.kthvalue(n_prune).values
    below = flat < thr
    keep &= ~below
    ties = (flat == thr).nonzero().squeeze(1)
    keep[ties[: n_prune - int(below.sum())]] = False
    return keep


def rowwise_keep_mask(scores: torch.Tensor, s: float, *, tie_rule: str = "index",
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise selection (spec §4.1): keep ``cols − ⌊cols·s⌋`` entries per row, stable tie-break.

    >>> rowwise_keep_mask(torch.tensor([[1., 2., .3, 1.]]), 0.5).tolist()  # spec §10
    [[False, True, False, True]]
    """
    _check_ratio("sparsity", s)
    _check_tie_rule(tie_rule)
    if scores.dim() != 2:
        raise ValueError(f"row-wise selection needs a 2-D score matrix, got shape {tuple(scores.shape)}")
    cols = scores.shape[1]
    n_prune = int(cols * s) if tie_rule == "reference" else cols - kept_by_sparsity(cols, s)
    keep = _stable_keep_last(scores.float(), n_prune)
    if tie_rule == "reference" and weight is not None:
        keep &= weight.to(keep.device) != 0
    return keep


def magnitude_keep_mask(scores: torch.Tensor, s: float, *, tie_rule: str = "index",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-matrix selection (spec §4.6 step B): keep the top ``⌈(1−s)·n⌉`` entries of ``scores``.

    ``tie_rule="reference"``: prune ``scores ≤ sorted[int(n·s)]``; if that threshold is 0, prune each exact zero
    with probability ``s / frac_zero`` (drawn from ``generator``) and nothing else.

    >>> magnitude_keep_mask(torch.tensor([.1, .5, .2, .9, .3]), 0.4, tie_rule="reference").tolist()  # spec §10
    [False, True, False, True, False]
    """
    _check_ratio("sparsity", s)
    _check_tie_rule(tie_rule)
    flat = scores.detach().float().reshape(-1)
    n = flat.numel()
    if tie_rule == "index":
        return _threshold_keep(flat, n - kept_by_sparsity(n, s)).reshape(scores.shape)
    thr = flat.kthvalue(min(int(n * s), n - 1) + 1).values  # sorted[int(n·s)]
    if thr == 0:
        zeros = flat == 0
        frac_zero = zeros.float().mean().item()
        draw = torch.rand(n, generator=generator)
        pruned = zeros & (draw < s / frac_zero)
    else:
        pruned = flat <= thr
    return (~pruned).reshape(scores.shape)


def top_set(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Bool mask of the top ``⌊share·n⌋`` entries over the whole matrix (ties: the higher flat index wins)."""
    _check_ratio("share", share, allow_one=True)
    flat = scores.detach().float().reshape(-1)
    k = floor_share(flat.numel(), share)  # the top-q / top-p sets of the set difference, merging.md §3.2
    return _threshold_keep(flat, flat.numel() - k).reshape(scores.shape)


def set_difference_mask(safety: torch.Tensor, utility: torch.Tensor, q: float, p: float) -> torch.Tensor:
    """``S_q \\ U_p``: the top-⌊q·n⌋ safety entries that are not among the top-⌊p·n⌋ utility entries
    (merging.md §3.2; q pairs with safety, p with utility)."""
    if safety.shape != utility.shape:
        raise ValueError(f"safety scores {tuple(safety.shape)} and utility scores {tuple(utility.shape)} differ")
    return top_set(safety, q) & ~top_set(utility, p)
