"""`nlsr reproduce` machinery on small stand-ins: which notebooks run, and how a failure or a Ctrl-C is reported."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from nlsr_lib import reproduce as rp
from nlsr_lib.errors import Interrupted, UsageError

PARAMS = Path(__file__).resolve().parents[1] / "params"


def _notebook(path: Path, *sources: str, parameters: int | None = None) -> Path:
    """A notebook whose cells are ``sources`` (``#md`` first line: markdown); cell ``parameters`` is tagged."""
    cells = []
    for i, src in enumerate(sources):
        cell = nbformat.v4.new_markdown_cell(src[3:]) if src.startswith("#md") else nbformat.v4.new_code_cell(src)
        if i == parameters:
            cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_the_seven_notebooks_run_by_name_never_a_lab_copy(tmp_path):
    for name in rp.NOTEBOOKS:
        _notebook(tmp_path / f"{name}.ipynb", "1")
    _notebook(tmp_path / "01_alignment-Copy1.ipynb", "1")
    _notebook(tmp_path / "03_scratch.ipynb", "1")
    assert [p.name for p in rp.notebooks(only="01", directory=tmp_path)] == ["01_alignment.ipynb"]
    assert [p.stem for p in rp.notebooks(start="05", directory=tmp_path)] == list(rp.NOTEBOOKS[4:])
    assert [p.stem for p in rp.notebooks(directory=tmp_path)] == list(rp.NOTEBOOKS)
    assert [p.stem for p in rp.notebooks()] == list(rp.NOTEBOOKS)  # the repository has all seven


@pytest.mark.parametrize("kwargs, message", [
    ({"only": "1"}, r"--only 1: expected a two-digit notebook number, one of 01, 02, 03, 04, 05, 06, 07"),
    ({"only": "99"}, r"--only 99: there is no notebook 99; choose one of 01, .*, 07"),
    ({"start": "08"}, r"--from 08: there is no notebook 08"),
    ({"start": "a"}, r"--from a: expected a two-digit notebook number"),
])
def test_a_bad_notebook_number_lists_the_allowed_ones(kwargs, message):
    with pytest.raises(UsageError, match=message):
        rp.notebooks(**kwargs)


def test_failing_cell_counts_cells_of_the_source_notebook(tmp_path):
    """The executed copy has papermill's cells the source has not: an error banner at the top, the injected
    parameters after the `parameters` cell and an anchor before the failing cell."""
    def cell(tags=(), error=False, source="x = 1", kind="code"):
        c = {"cell_type": kind, "metadata": {"tags": list(tags)}, "source": source}
        if kind == "code":
            c["outputs"] = [{"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []}] \
                if error else []
        return c

    banner = anchor = cell(["papermill-error-cell-tag"], kind="markdown")
    executed = {"cells": [banner, cell(kind="markdown"), cell(["parameters"]), cell(["injected-parameters"]),
                          cell(), anchor, cell(error=True, source="raise ValueError('boom')"), cell()]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(executed))
    assert rp.failing_cell(path) == (3, "ValueError: boom", "raise ValueError('boom')")  # source: md, params, x, raise
    executed["cells"][3] = cell(["injected-parameters"], error=True)
    path.write_text(json.dumps(executed))
    index, error, _ = rp.failing_cell(path)
    assert index == 1 and error.endswith("(in the parameters papermill injected)")  # reported at the parameters cell


def test_a_failing_notebook_reports_the_source_cell_index(tmp_path):
    nb = _notebook(tmp_path / "01_x.ipynb", "#md # title", 'params_file = "default.yaml"', "a = 1",
                   "#md ## then", "raise ValueError(f'boom {params_file}')", "b = 2", parameters=1)
    executed = tmp_path / "out" / "01_x.ipynb"
    executed.parent.mkdir()
    with pytest.raises(rp.NotebookFailure) as info:
        rp.execute(nb, executed, tmp_path / "given.yaml")
    failure = info.value
    assert failure.cell_index == 4 and nbformat.read(nb, 4).cells[4].source.startswith("raise ValueError")
    assert failure.error == f"ValueError: boom {tmp_path / 'given.yaml'}" and failure.executed_path == executed
    assert str(failure).startswith("01_x.ipynb failed at cell 4 (`raise ValueError(f'boom {params_file}')`): ")
    assert "\n" not in str(failure)


def test_ctrl_c_during_a_notebook_names_it(tmp_path, monkeypatch):
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:  # still a KeyboardInterrupt for Python callers
        rp.execute(tmp_path / "05_y.ipynb", tmp_path / "out.ipynb", tmp_path / "p.yaml")
    assert isinstance(info.value, Interrupted) and info.value.what.startswith("notebook 05_y.ipynb")


def test_a_safetensors_failure_in_a_kernel_names_the_broken_file(nlsr_home, monkeypatch):
    from nlsr_lib.paths import runs_dir

    broken = runs_dir("smoke") / "align" / "dpo" / "0123456789abcdef" / "adapter" / "adapter_model.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_bytes((1000).to_bytes(8, "little") + b"{")

    def fails(nb, executed, *args):
        raise rp.NotebookFailure(nb.name, 6, "SafetensorError: Error while deserializing header: incomplete "
                                             "metadata, file not fully covered", executed)

    monkeypatch.setattr(rp, "execute", fails)
    with pytest.raises(rp.NotebookFailure) as info:
        rp.reproduce(PARAMS / "smoke.yaml", only="01", log=lambda *_: None)
    assert f"[{broken} is not a complete safetensors file: the header announces 1000 bytes" in info.value.error
