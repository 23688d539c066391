"""Run the numbered notebooks headless with papermill (DESIGN.md §2).

``reproduce(params_file, only=..., start=...)`` executes the seven notebooks of :data:`NOTEBOOKS` — by name, so
a JupyterLab "save a copy" such as ``01_alignment-Copy1.ipynb`` is never run — in order into
``runs/<profile>/executed/`` with the params file injected as a parameter, and stops at the first failing
notebook with :class:`NotebookFailure`: the failing cell's index **in the source notebook** (papermill's extra
cells are not counted), its first line, the error and the executed copy's path (for a ``SafetensorError``,
also the broken ``.safetensors`` file of the run directory, which the kernel's message does not name). A Ctrl-C raises
:class:`~nlsr_lib.errors.Interrupted` naming the notebook that was running; finished stages stay cached.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import load_params, resolve_params_path
from .errors import Interrupted, NlsrError, UsageError, find_unreadable_safetensors
from .paths import PROJECT_ROOT, runs_dir

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = ("01_alignment", "02_harmful_finetuning", "03_safety_reference", "04_safety_regions", "05_restoration",
             "06_model_fusion", "07_restoration_ablation")
NUMBERS = tuple(name[:2] for name in NOTEBOOKS)

# Cells papermill adds to the executed copy that the source notebook does not have.
INJECTED_TAG = "injected-parameters"  # the parameters it injected, right after the `parameters` cell
ERROR_MARKER_TAG = "papermill-error-cell-tag"  # on failure: a banner at the top, an anchor before the failing cell


@dataclass
class NotebookFailure(RuntimeError):
    notebook: str
    cell_index: int | None
    error: str
    executed_path: Path
    cell_source: str = ""

    def __str__(self) -> str:
        first = next((line.strip() for line in self.cell_source.splitlines() if line.strip()), "")
        code = f" (`{first[:80]}{'…' if len(first) > 80 else ''}`)" if first else ""
        return (f"{self.notebook} failed at cell {self.cell_index}{code}: {' '.join(self.error.split())}; "
                f"executed notebook: {self.executed_path}")


def _number(option: str, value: str | None) -> str | None:
    if value is None or value in NUMBERS:
        return value
    allowed = ", ".join(NUMBERS)
    if re.fullmatch(r"\d\d", str(value)):
        raise UsageError(f"{option} {value}: there is no notebook {value}; choose one of {allowed} "
                         f"({NOTEBOOKS[0]} … {NOTEBOOKS[-1]})")
    raise UsageError(f"{option} {value}: expected a two-digit notebook number, one of {allowed} "
                     f"({NOTEBOOKS[0]} … {NOTEBOOKS[-1]})")


def notebooks(only: str | None = None, start: str | None = None, directory: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The notebooks of :data:`NOTEBOOKS` in order, optionally just ``only`` (e.g. ``"01"``) or from ``start`` on.

    Raises :class:`~nlsr_lib.errors.UsageError` for a number that is not two digits or names no notebook
    (``"1"``, ``"99"``), listing the allowed ones, and :class:`~nlsr_lib.errors.NlsrError` if a selected notebook
    is missing from ``directory``."""
    only, start = _number("--only", only), _number("--from", start)
    names = [n for n in NOTEBOOKS if (only is None or n[:2] == only) and (start is None or n[:2] >= start)]
    paths = [directory / f"{name}.ipynb" for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise NlsrError(f"notebook {missing[0]} is missing (the notebooks are {', '.join(NOTEBOOKS)})")
    return paths


def failing_cell(executed: Path) -> tuple[int | None, str, str]:
    """(index of the failing cell in the source notebook, ``"Ename: evalue"``, the cell's source) read from an
    executed copy. The cells papermill added (the ``injected-parameters`` cell after the ``parameters`` cell, and
    on failure the error banner at the top and the anchor before the failing cell) are not counted; an error in
    the injected cell is reported at the ``parameters`` cell it stands for."""
    nb = json.loads(Path(executed).read_text())
    index = 0
    for cell in nb.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", [])
        if ERROR_MARKER_TAG in tags:
            continue
        injected = INJECTED_TAG in tags
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                source = cell.get("source", "")
                source = "".join(source) if isinstance(source, list) else source
                error = f"{output.get('ename')}: {output.get('evalue')}"
                if injected:
                    return max(index - 1, 0), error + " (in the parameters papermill injected)", source
                return index, error, source
        if not injected:
            index += 1
    return None, "unknown error", ""


@contextmanager
def headless_progress():
    """The kernels papermill starts inherit ``NLSR_PROGRESS=lines`` (one line per stage, no bars in the executed
    notebook) unless the caller set a mode of their own (nlsr_lib/progress.py)."""
    before = os.environ.get("NLSR_PROGRESS")
    os.environ.setdefault("NLSR_PROGRESS", "lines")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("NLSR_PROGRESS", None)


def execute(notebook: Path, executed: Path, params_path: Path, kernel_name: str = "python3",
            progress: bool = False) -> float:
    """Execute one notebook with papermill (kernel in the notebook's folder, ``params_file`` injected) into
    ``executed``; returns the seconds it took. Raises :class:`NotebookFailure` or
    :class:`~nlsr_lib.errors.Interrupted`."""
    import papermill as pm

    t0 = time.perf_counter()
    try:
        with headless_progress():
            pm.execute_notebook(str(notebook), str(executed), parameters={"params_file": str(params_path)},
                                cwd=str(notebook.parent), kernel_name=kernel_name, progress_bar=progress,
                                log_output=False)
    except pm.PapermillExecutionError as err:
        if executed.is_file():
            index, error, source = failing_cell(executed)
        else:  # pragma: no cover - papermill writes the copy before raising
            index, error, source = None, "", err.source
        raise NotebookFailure(notebook.name, index, error if index is not None else f"{err.ename}: {err.evalue}",
                              executed, source) from None
    except KeyboardInterrupt:
        raise Interrupted(f"notebook {notebook.name} (partial copy: {executed})") from None
    return round(time.perf_counter() - t0, 1)


def reproduce(params_file: str | Path, only: str | None = None, start: str | None = None,
              kernel_name: str = "python3", log=print, progress: bool = False) -> list[tuple[str, float]]:
    """Execute the notebooks; returns ``[(notebook, seconds)]``; raises :class:`NotebookFailure`.

    ``params_file`` follows :func:`nlsr_lib.config.resolve_params_path`; the kernels get its absolute path."""
    selected = notebooks(only, start)
    profile = load_params(params_file).profile  # a missing file is named with every place looked at
    params_path = resolve_params_path(params_file).resolve()
    out_dir = runs_dir(profile) / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for nb in selected:
        executed = out_dir / nb.name
        log(f"[nlsr] executing {nb.name} on {params_path.name} -> {executed}")
        try:
            timings.append((nb.name, execute(nb, executed, params_path, kernel_name, progress)))
        except NotebookFailure as failure:
            if failure.error.startswith("SafetensorError"):  # the kernel's error does not name the file: find it
                found = find_unreadable_safetensors([runs_dir(profile)], recursive=True)
                if found is not None:
                    failure.error += f" [{found[0]} is not a complete safetensors file: {found[1]}]"
            raise
        log(f"[nlsr] {nb.name} done in {timings[-1][1]:.1f}s")
    return timings
