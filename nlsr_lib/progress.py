"""Progress bars and library noise: one home for both (DESIGN.md §7, "Progress").

The progress mode is one of

* ``bars``: tqdm bars (widgets in JupyterLab, text in a terminal) for every loop a person waits on;
* ``lines``: no bars; the stage cache prints one line when a stage starts building and one when it is done.
  ``nlsr reproduce`` runs its notebooks in this mode, so an executed notebook carries one line per stage;
* ``off``: nothing but the stage lines of :class:`~nlsr_lib.runs.Run` (and those only unless it is quiet).

It is read from ``NLSR_PROGRESS`` (``bars`` | ``lines`` | ``off``); without it, ``NLSR_QUIET`` (any value but
``0``) or ``CI`` mean ``off``, anything else ``bars``.

:func:`quiet_libraries` silences what the libraries print that is not a finding: the datasets library's
"Saving the dataset" bars, the hub's bars outside the ``bars`` mode (transformers' "Loading weights"), transformers' advisory notes and the known deprecation chatter of
:data:`NOISE`. Real warnings (anything else) still surface; notes that a call site can avoid are avoided there
(e.g. ``remove_unused_columns=False`` for the pairwise trl trainers).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Iterable

MODES = ("bars", "lines", "off")

# (category, message regex) of library warnings that say nothing about the study.
NOISE: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r".*gradient[_ ]checkpointing.*"),
    (UserWarning, r".*use_reentrant.*"),
    (UserWarning, r".*IProgress not found.*"),
)


def mode() -> str:
    """The progress mode (module docstring); an unknown ``NLSR_PROGRESS`` value is an error naming the choices."""
    explicit = os.environ.get("NLSR_PROGRESS", "").strip().lower()
    if explicit:
        if explicit not in MODES:
            raise ValueError(f"NLSR_PROGRESS={explicit!r} is not a progress mode; choose one of {', '.join(MODES)}")
        return explicit
    if os.environ.get("NLSR_QUIET", "") not in ("", "0") or os.environ.get("CI"):
        return "off"
    return "bars"


def bars_enabled() -> bool:
    return mode() == "bars"


def bar(iterable: Iterable | None = None, desc: str = "", total: int | None = None, enabled: bool = True, **kwargs):
    """A tqdm bar (``tqdm.auto``: a widget in Jupyter, text in a terminal), disabled unless the mode is ``bars``."""
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    kwargs.setdefault("mininterval", 2.0)
    return tqdm(iterable, desc=desc, total=total, disable=not (enabled and bars_enabled()), **kwargs)


_CONFIGURED = False


def quiet_libraries() -> None:
    """Silence the libraries' routine output once per process (idempotent; imports nothing heavy). Called when
    ``nlsr_lib`` is imported; ``setdefault`` leaves a user's own setting of these variables alone."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO / KTO / SimPO live in trl.experimental (trl 1.16)
    if mode() != "bars":  # the hub's bars too (transformers' "Loading weights" for every model load)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "datasets" in sys.modules:  # imported before nlsr_lib: the variable above is read at import
        sys.modules["datasets"].disable_progress_bars()
