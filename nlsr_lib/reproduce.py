"""Run the numbered notebooks headless with papermill (DESIGN.md §2).

``reproduce(params_file, only=..., start=...)`` executes ``notebooks/NN_*.ipynb`` in order into
``runs/<profile>/executed/`` with the params file injected as a parameter, and stops at the first failing
notebook, reporting the failing cell's index, its error and the executed notebook's path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import load_params, resolve_params_path
from .paths import PROJECT_ROOT, runs_dir

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


@dataclass
class NotebookFailure(RuntimeError):
    notebook: str
    cell_index: int | None
    error: str
    executed_path: Path

    def __str__(self) -> str:
        return (f"{self.notebook} failed at cell {self.cell_index}: {self.error}\n"
                f"executed notebook: {self.executed_path}")


def notebooks(only: str | None = None, start: str | None = None) -> list[Path]:
    """The numbered notebooks, optionally just ``only`` (e.g. ``"01"``) or from ``start`` on."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only is not None:
        found = [p for p in found if p.name.startswith(only)]
        if not found:
            raise ValueError(f"--only {only}: no notebook notebooks/{only}_*.ipynb")
    if start is not None:
        found = [p for p in found if p.name[:2] >= start]
        if not found:
            raise ValueError(f"--from {start}: no notebook numbered {start} or later")
    return found


def _failing_cell(executed: Path) -> tuple[int | None, str]:
    nb = json.loads(executed.read_text())
    for index, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, f"{output.get('ename')}: {output.get('evalue')}"
    return None, "unknown error"


def reproduce(params_file: str | Path, only: str | None = None, start: str | None = None,
              kernel_name: str = "python3", log=print, progress: bool = False) -> list[tuple[str, float]]:
    """Execute the notebooks; returns ``[(notebook, seconds)]``; raises :class:`NotebookFailure`."""
    import papermill as pm

    params_path = resolve_params_path(params_file).resolve()
    profile = load_params(params_path).profile
    out_dir = runs_dir(profile) / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for nb in notebooks(only, start):
        executed = out_dir / nb.name
        log(f"[nlsr] executing {nb.name} on {params_path.name} -> {executed}")
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(executed), parameters={"params_file": str(params_path)},
                                cwd=str(NOTEBOOKS_DIR), kernel_name=kernel_name, progress_bar=progress,
                                log_output=False)
        except pm.PapermillExecutionError as err:
            index, _ = _failing_cell(executed)
            raise NotebookFailure(nb.name, index if index is not None else err.cell_index,
                                  f"{err.ename}: {err.evalue}", executed) from None
        timings.append((nb.name, round(time.perf_counter() - t0, 1)))
        log(f"[nlsr] {nb.name} done in {timings[-1][1]:.1f}s")
    return timings
