"""The `nlsr` console script: params validation, stage runs, reproduce argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlsr_lib.cli import main
from nlsr_lib.reproduce import notebooks

PARAMS = Path(__file__).resolve().parents[1] / "params"


def test_params_prints_the_resolved_file(capsys):
    assert main(["params", str(PARAMS / "mistral_7b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "mistralai/Mistral-7B-v0.3" in out and "r: 128" in out


def test_misspelt_key_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(f"extends: {PARAMS / 'tiny.yaml'}\nlora: {{rank: 8}}\n")
    assert main(["params", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key lora.rank" in capsys.readouterr().err


def test_stage_world_runs_and_caches(nlsr_home, capsys):
    assert main(["stage", "world", "--params", str(PARAMS / "smoke.yaml")]) == 0
    assert (nlsr_home / "runs" / "smoke" / "world" / "manifest.json").is_file()
    assert main(["stage", "world", "--params", str(PARAMS / "smoke.yaml")]) == 0


def test_align_stage_needs_a_method(nlsr_home):
    with pytest.raises(SystemExit, match="needs --method"):
        main(["stage", "align", "--params", str(PARAMS / "smoke.yaml")])


def test_notebook_selection():
    assert [p.name[:2] for p in notebooks(only="01")] == ["01"]
    with pytest.raises(ValueError, match="no notebook"):
        notebooks(only="99")
