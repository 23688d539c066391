"""The `nlsr` console script: params validation, stage runs and their cache, one-line errors and interrupts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nlsr_lib.cli import main
from nlsr_lib.stages import STAGES

PARAMS = Path(__file__).resolve().parents[1] / "params"
SMOKE = str(PARAMS / "smoke.yaml")


def _world_manifest(nlsr_home: Path) -> Path:
    (manifest,) = (nlsr_home / "runs" / "smoke" / "world").glob("*/manifest.json")  # world/<fingerprint[:16]>/
    return manifest


@pytest.fixture
def patch_world(monkeypatch):
    """Replace the request function of the stage kind ``world`` (what ``nlsr stage run world`` calls)."""
    import dataclasses

    def patch(function):
        monkeypatch.setitem(STAGES._entries, "world", dataclasses.replace(STAGES["world"], function=function))
    return patch


def _one_line_error(capsys) -> str:
    """The captured stderr, checked to be exactly one `[nlsr] ...` line without a traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("[nlsr] ") and "Traceback" not in err, err
    return err


def test_params_prints_the_resolved_file(capsys):
    assert main(["params", str(PARAMS / "mistral_7b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "mistralai/Mistral-7B-v0.3" in out and "r: 128" in out


def test_misspelt_key_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(f"extends: {PARAMS / 'tiny.yaml'}\nlora: {{rank: 8}}\n")
    assert main(["params", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key lora.rank" in _one_line_error(capsys)


def test_a_params_path_is_looked_up_in_the_shell_directory_first(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.yaml").write_text("extends: " + str(PARAMS / "smoke.yaml") + "\nprofile: mine\n")
    monkeypatch.chdir(tmp_path)
    assert main(["params", "mine.yaml"]) == 0 and "profile: mine" in capsys.readouterr().out
    assert main(["params", "params/smoke.yaml"]) == 0  # not here: relative to the repository root
    assert "profile: smoke" in capsys.readouterr().out


def test_stage_world_runs_then_hits_the_cache(nlsr_home, capsys):
    assert main(["stage", "run", "world", "--params", SMOKE]) == 0
    manifest = _world_manifest(nlsr_home)
    assert manifest.is_file() and "world: building" in capsys.readouterr().out
    before = manifest.stat().st_mtime_ns
    assert main(["stage", "run", "world", "--params", SMOKE]) == 0
    out = capsys.readouterr().out
    assert "world: cached" in out and "building" not in out
    assert manifest.stat().st_mtime_ns == before


def test_cache_ls_lists_artifacts_and_gc_removes_leftovers(nlsr_home, capsys):
    import json
    import os

    assert main(["stage", "run", "world", "--params", SMOKE]) == 0
    capsys.readouterr()
    assert main(["cache", "ls", "--params", SMOKE, "--json"]) == 0
    (world,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    manifest = json.loads(_world_manifest(nlsr_home).read_text())
    assert world["stage"] == "world" and world["fingerprint"] == manifest["fingerprint"] and world["bytes"] > 0
    leftover = nlsr_home / "runs" / "smoke" / ".tmp-world-0123456789ab"  # a killed launch's shared build
    leftover.mkdir()
    old = leftover.stat().st_mtime - 3 * 24 * 3600
    os.utime(leftover, (old, old))
    assert main(["cache", "gc", "--params", SMOKE, "--dry-run"]) == 0 and leftover.is_dir()
    assert "would remove 1 leftover(s) and 0 unreachable" in capsys.readouterr().out
    assert main(["cache", "gc", "--params", SMOKE]) == 0 and not leftover.exists()
    assert _world_manifest(nlsr_home).is_file()  # an artifact the plan reaches is kept


def test_align_stage_needs_a_method(nlsr_home, capsys):
    assert main(["stage", "run", "align", "--params", SMOKE]) == 2
    assert "stage align needs method=… (arguments: method)" in _one_line_error(capsys)


def test_stage_list_prints_each_stage_with_its_summary_and_reads(capsys):
    from nlsr_lib.stages.world import world_stage

    assert main(["stage", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines[::2]]
    assert names == list(STAGES)
    assert {"world", "align", "attack", "reference", "mask", "restore", "fusion"} <= set(names)
    assert lines[0].split(None, 3)[1:] == ["v2", "cpu", world_stage.__doc__.strip()]
    assert all(line.split()[0] == "reads:" for line in lines[1::2])  # every stage declares what it reads


def test_an_unknown_registry_name_is_a_one_line_error(nlsr_home, patch_world, capsys):
    from nlsr_lib.data.tasks import get_task

    patch_world(lambda params, run: get_task("mnli"))
    assert main(["stage", "run", "world", "--params", SMOKE]) == 2
    assert "[nlsr] error: unknown task 'mnli'; registered: sst2, ag_news, gsm8k" in _one_line_error(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["reproduce", "--params", SMOKE, "--only", "1"], "--only 1: expected a two-digit notebook number, one of 01, 02"),
    (["reproduce", "--params", SMOKE, "--only", "99"], "--only 99: there is no notebook 99; choose one of 01, 02"),
    (["reproduce", "--params", SMOKE, "--from", "99"], "--from 99: there is no notebook 99"),
    (["stage", "run", "align", "--params", SMOKE, "--method", "dpoo"], "invalid choice: 'dpoo'"),
    (["stage", "run", "wrold", "--params", SMOKE], "unknown stage 'wrold'; registered: world, tokenizer"),
    (["stage", "run", "attack", "method=dpo", "task=sst2", "--params", SMOKE], "stage attack needs p=…"),
    (["stage", "run", "world", "colour=red", "--params", SMOKE], "stage world takes no colour"),
    (["stage", "run", "generations", "model=attack:dpo", "--params", SMOKE], "model=attack:dpo: not a model"),
    (["plan", "--params", SMOKE, "--only", "8"], "--only 8: expected a two-digit notebook number"),
    (["run", "--params", SMOKE, "--executor", "dask"], "unknown executor 'dask'; registered: local, ray"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
])
def test_bad_command_line_values_are_one_line_errors(argv, expected, nlsr_home, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusals exit; ours return
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = _one_line_error(capsys)
    assert err.startswith("[nlsr] error: ") and expected in err, err
    if "--method" in argv:
        assert all(m in err for m in ("sft", "dpo", "orpo", "kto", "simpo"))
    if "--only" in argv or "--from" in argv:
        assert "07" in err
    assert not (nlsr_home / "runs").exists()  # refused before anything ran


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "parent.yaml").write_text("profile: p\nlora:\n  r: 4\n   alpha: 8\n")  # bad indent on line 4
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nprofile: c\n")
    assert main(["params", str(tmp_path / "child.yaml")]) == 2
    err = _one_line_error(capsys)
    assert f"{tmp_path / 'parent.yaml'}, line 4" in err and "invalid YAML" in err


def _stage_that(build_inner):
    """A stand-in for the world stage's request function: stage `world` whose build runs stage `inner`, built by
    `build_inner`."""
    def world_stage(params, run):
        return run.stage("world", {}, lambda out: run.stage("inner", {}, build_inner) and {})
    return world_stage


def test_ctrl_c_in_a_stage_is_one_line_naming_it_and_exits_130(nlsr_home, patch_world, capsys):
    def interrupted(out):
        raise KeyboardInterrupt

    patch_world(_stage_that(interrupted))
    assert main(["stage", "run", "world", "--params", SMOKE]) == 130
    err = _one_line_error(capsys)
    assert "interrupted: stage world (while building stage inner)" in err and "again to resume" in err
    assert not [p for p in (nlsr_home / "runs" / "smoke").rglob("*") if p.is_file()]  # nothing half-built is left


def test_ctrl_c_in_reproduce_names_the_notebook(nlsr_home, monkeypatch, capsys):
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    assert main(["reproduce", "--params", SMOKE, "--only", "02"]) == 130
    assert "interrupted: notebook 02_harmful_finetuning.ipynb" in _one_line_error(capsys)


def test_a_truncated_safetensors_file_is_named(nlsr_home, patch_world, capsys):
    import torch

    from nlsr_lib.models import read_adapter, write_adapter

    adapter = nlsr_home / "adapter"
    write_adapter(adapter, {"a.lora_A.weight": torch.ones(4, 8)}, {"r": 4, "lora_alpha": 8})
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def world_stage(params, run):
        return run.stage("world", {}, lambda out: read_adapter(adapter))

    patch_world(world_stage)
    assert main(["stage", "run", "world", "--params", SMOKE]) == 2
    err = _one_line_error(capsys)
    assert f"cannot read {weights}: not a complete safetensors file" in err and "truncated" in err


def test_an_unexpected_exception_keeps_its_traceback(nlsr_home, patch_world):
    def bug(params, run):
        raise ZeroDivisionError("a bug")

    patch_world(bug)
    with pytest.raises(ZeroDivisionError):
        main(["stage", "run", "world", "--params", SMOKE])


def test_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "130" in out and "one line" in out and os.linesep in out
