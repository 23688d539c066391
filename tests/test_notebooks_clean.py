"""Notebooks are committed without outputs, have a `parameters` cell, and match their py:percent twins.

The notebooks are the seven of ``nlsr_lib.reproduce.NOTEBOOKS``, by name: a JupyterLab "save a copy"
(``01_alignment-Copy1.ipynb``) lying in notebooks/ is neither checked here nor run by ``nlsr reproduce``.
"""

from __future__ import annotations

import jupytext
import nbformat
import pytest

from nlsr_lib.reproduce import NOTEBOOKS as NAMES
from nlsr_lib.reproduce import NOTEBOOKS_DIR

NOTEBOOKS = [NOTEBOOKS_DIR / f"{name}.ipynb" for name in NAMES]


def test_there_are_notebooks():
    assert NOTEBOOKS and all(path.is_file() for path in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.outputs or c.execution_count for c in code), f"{path.name} has outputs: strip them"
    assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{path.name}: no 'parameters' cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_py_percent_twin_in_sync(path):
    twin = path.with_suffix(".py")
    assert twin.is_file(), f"{path.name} has no py:percent twin {twin.name}"
    a, b = jupytext.read(path), jupytext.read(twin)
    cells = lambda nb: [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]  # noqa: E731
    assert cells(a) == cells(b), f"{path.name} and {twin.name} differ: run `make sync-notebooks`"
