"""Papermill smoke runs of the notebooks on params/smoke.yaml (every code path, fewest steps)."""

from __future__ import annotations

import json

import pytest

from nlsr_lib.paths import figures_dir, results_dir, runs_dir
from nlsr_lib.reproduce import NotebookFailure, reproduce

pytestmark = pytest.mark.notebook


def test_notebook_01_alignment_smoke(nlsr_home):
    timings = reproduce("params/smoke.yaml", only="01", log=lambda *_: None)
    assert [name for name, _ in timings] == ["01_alignment.ipynb"]
    records = json.loads((results_dir("smoke") / "01_alignment.json").read_text())
    assert {r["method"] for r in records} == {"base", "sft", "dpo", "orpo", "kto", "simpo"}
    assert {r["judge"] for r in records} == {"moderation", "keyword"}
    assert all(0 <= r["harmful_score"] <= 100 for r in records)
    assert (results_dir("smoke") / "01_alignment.md").read_text().startswith("| method | judge |")
    for suffix in ("png", "pdf"):
        assert (figures_dir("smoke") / f"01_harmful_score_by_method.{suffix}").stat().st_size > 1000
    # a second run hits the cache for every stage and gives the same table
    reproduce("params/smoke.yaml", only="01", log=lambda *_: None)
    assert json.loads((results_dir("smoke") / "01_alignment.json").read_text()) == records
    executed = (runs_dir("smoke") / "executed" / "01_alignment.ipynb").read_text()
    assert "stages built in this run: none (all cached)" in executed


def test_failing_notebook_reports_cell_error_and_path(nlsr_home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(__import__("nlsr_lib.paths").paths.PROJECT_ROOT / "params/smoke.yaml")
                   + "\njudges: {moderation: {model: /nonexistent/judge}}\n")
    with pytest.raises(NotebookFailure) as info:
        reproduce(bad, only="01", log=lambda *_: None)
    assert info.value.cell_index is not None and info.value.executed_path.is_file()
    assert "nonexistent" in str(info.value) or "Error" in info.value.error
