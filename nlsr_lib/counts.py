"""How many of ``n`` entries a share selects: the one home of the project's exact counts (DESIGN.md §6).

A share is read as the decimal the user wrote (``Fraction(repr(x))``), so ``0.57·100`` is 57, not 56.999…:

* :func:`kept_by_sparsity` — a safety mask at sparsity ``s`` keeps ``⌈(1−s)·n⌉ = n − ⌊n·s⌋`` entries (DESIGN.md §6
  "magnitude mask"; the row-wise and per-matrix masks of :mod:`nlsr_lib.regions.selection`); ``s`` in [0, 1).
* :func:`kept_by_density` — TIES keeps the top ``⌊d·n⌋`` magnitudes at density ``d`` (spec/somf.md §3.3;
  :mod:`nlsr_lib.fusion.select`); ``d`` in [0, 1].
* :func:`floor_share` — ``⌊n·x⌋`` itself: the entries a mask prunes, the top-q / top-p sets of a set difference.
"""

from __future__ import annotations

import math
from fractions import Fraction


def floor_share(n: int, x: float) -> int:
    """``⌊n·x⌋`` computed exactly on the decimal value of ``x``."""
    return math.floor(n * Fraction(repr(float(x))))


def kept_by_sparsity(n: int, s: float) -> int:
    """Entries a mask keeps out of ``n`` at sparsity ``s``: ``⌈(1−s)·n⌉ = n − ⌊n·s⌋``."""
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {s!r}")
    return n - floor_share(n, s)


def kept_by_density(n: int, d: float) -> int:
    """Entries TIES keeps out of ``n`` at density ``d``: ``⌊d·n⌋``."""
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {d!r}")
    return floor_share(n, d)


__all__ = ["floor_share", "kept_by_density", "kept_by_sparsity"]
