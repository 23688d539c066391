"""Errors a user can act on, and the one place that turns low-level failures into them.

* :class:`NlsrError` — the base of every project error whose message alone says what is wrong and what is
  allowed (a params file, a command-line value, an unreadable file). The ``nlsr`` command prints it as one line,
  ``[nlsr] error: <message>``, and exits with status 2; Python callers (notebooks, tests) see an ordinary
  exception. :class:`~nlsr_lib.config.ParamsError` is one.
* :class:`UsageError` — a value typed on the command line or passed to a library entry point is not allowed
  (``--only 1``, ``--method dpoo``).
* :class:`UnreadableFileError` — a file exists but cannot be read as what it must be, e.g. a ``.safetensors``
  file cut short by a killed copy or a full disk. :func:`explain_unreadable_safetensors` builds it from the
  low-level exception (``safetensors_rust.SafetensorError: ... incomplete metadata``, ``header too large``, a
  short read), naming the file: loaders do not need a ``try``/``except`` each.
* :class:`Interrupted` — a ``KeyboardInterrupt`` (still one, so ``except KeyboardInterrupt`` keeps working) that
  says what was running (``notebook 03_safety_reference.ipynb``), so the command line can say it in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Iterable

SAFETENSORS_SUFFIX = ".safetensors"


class NlsrError(Exception):
    """A problem the user can fix; the message names it (the ``nlsr`` CLI prints it on one line, exit 2)."""


class UsageError(NlsrError, ValueError):
    """A command-line or entry-point value that is not allowed; the message lists what is."""


class UnreadableFileError(NlsrError, ValueError):
    """A file that exists but cannot be read as what it must be; the message names the path and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot read {self.path}: {reason}")


class Interrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` that records what was running when it came (``what``), e.g. ``"notebook 02_…"``."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(what)


# --------------------------------------------------------------------------------------------- safetensors
def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header only, no tensor is read), or None if it is one.

    Format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to its
    ``data_offsets`` [begin, end) within the data that follows; the offsets tile the data exactly.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"the file has {size} bytes, fewer than the 8-byte header length (empty or truncated)"
            n = int.from_bytes(raw, "little")
            if 8 + n > size:
                return (f"the header announces {n} bytes but the file has {size} bytes in all "
                        "(truncated, or not a safetensors file)")
            header = json.loads(fh.read(n))
    except OSError as err:
        return f"{err.strerror or err}"
    except (ValueError, UnicodeDecodeError):
        return "the header is not valid JSON (corrupted, or not a safetensors file)"
    if not isinstance(header, dict):
        return "the header is not a JSON object (corrupted, or not a safetensors file)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2]
    expected = 8 + n + max(ends, default=0)
    if expected > size:
        return f"the tensors need {expected} bytes but the file has {size} (truncated: re-create it)"
    if expected < size:
        return f"{size - expected} bytes follow the last tensor (corrupted: re-create it)"
    return None


def _candidate_paths(tb) -> list[Path]:
    """``.safetensors`` files, and the ones directly inside directories, named by the local variables of a
    traceback's frames, innermost frame first."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    found: list[Path] = []
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            if not isinstance(value, (str, os.PathLike)) or len(os.fspath(value)) > 4096:
                continue
            try:
                p = Path(os.fspath(value))
                if p.suffix == SAFETENSORS_SUFFIX:
                    found.append(p)
                elif p.name and p.is_dir():
                    found.extend(sorted(p.glob(f"*{SAFETENSORS_SUFFIX}")))
            except (OSError, ValueError, TypeError):  # not a path at all (a NUL byte, bytes, a permission)
                continue
    return found


def find_unreadable_safetensors(paths: Iterable[str | Path], recursive: bool = False) -> tuple[Path, str] | None:
    """The first ``.safetensors`` file among ``paths`` (files, or the ones inside directories; in their
    subdirectories too if ``recursive``) that is not a complete safetensors file, with the reason; None when every
    one is sound."""
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.suffix == SAFETENSORS_SUFFIX:
            files = [p]
        elif p.is_dir():
            files = sorted(p.rglob(f"*{SAFETENSORS_SUFFIX}") if recursive else p.glob(f"*{SAFETENSORS_SUFFIX}"))
        else:
            files = []
        for f in files:
            if f in seen or not f.is_file():
                continue
            seen.add(f)
            problem = safetensors_problem(f)
            if problem is not None:
                return f, problem
    return None


def is_safetensors_error(exc: BaseException) -> bool:
    """The safetensors library's own error (``safetensors_rust.SafetensorError``, whatever module exposes it)."""
    return any(cls.__name__ == "SafetensorError" for cls in type(exc).__mro__)


def explain_unreadable_safetensors(exc: BaseException, search: Iterable[str | Path] = ()) -> UnreadableFileError | None:
    """An :class:`UnreadableFileError` naming the broken ``.safetensors`` file behind ``exc``, or None.

    The low-level errors do not name the file (``SafetensorError: Error while deserializing header: incomplete
    metadata, file not fully covered``). The file is found, header only, among the paths held by the failing
    frames' local variables (``load_file(filename)``, ``safe_open(path)``, ``from_pretrained``'s checkpoint file,
    an adapter directory), innermost first, then anywhere under the directories of ``search`` (e.g. the run directory).
    Besides the library's own error, the errors a reader raises on a short or garbled file (``OSError``,
    ``ValueError``, ``EOFError``, ``RuntimeError``) qualify when such a broken file is found in their frames;
    ``search`` is only used for the safetensors library's own error. Anything else (a bug) is left alone.
    """
    if isinstance(exc, NlsrError):
        return None
    if not (is_safetensors_error(exc) or isinstance(exc, (OSError, ValueError, EOFError, RuntimeError))):
        return None
    found = find_unreadable_safetensors(_candidate_paths(exc.__traceback__))
    if found is None and is_safetensors_error(exc):
        found = find_unreadable_safetensors(search, recursive=True)
    if found is None:
        return None
    return UnreadableFileError(found[0], f"not a complete safetensors file: {found[1]} ({type(exc).__name__})")


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


__all__ = ["NlsrError", "UsageError", "UnreadableFileError", "Interrupted", "safetensors_problem",
           "find_unreadable_safetensors", "explain_unreadable_safetensors", "is_safetensors_error", "one_line"]
