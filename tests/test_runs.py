"""Stage cache: hits on identical inputs, recompute on change or force, nothing half-written is trusted."""

from __future__ import annotations

import json
import os

import pytest

from nlsr_lib.runs import MANIFEST, Run, atomic_write_json, atomic_write_text


def _writer(calls: list, text: str = "hello"):
    def build(out):
        calls.append(out)
        (out / "file.txt").write_text(text)
        return {"chars": len(text)}
    return build


def test_second_call_hits_the_cache(tmp_path):
    run, calls = Run("t", root=tmp_path, quiet=True), []
    a = run.stage("s", {"x": 1}, _writer(calls))
    b = run.stage("s", {"x": 1}, _writer(calls))
    assert len(calls) == 1 and b.cached and not a.cached and a.fingerprint == b.fingerprint
    assert (b.path / "file.txt").read_text() == "hello" and b.manifest()["summary"] == {"chars": 5}


def test_config_or_input_change_recomputes(tmp_path):
    run, calls = Run("t", root=tmp_path, quiet=True), []
    up1 = run.stage("up", {"v": 1}, _writer([]))
    run.stage("down", {}, _writer(calls), inputs={"up": up1})
    up2 = run.stage("up", {"v": 2}, _writer([]))
    down = run.stage("down", {}, _writer(calls), inputs={"up": up2})
    run.stage("down", {"extra": True}, _writer(calls), inputs={"up": up2})
    assert len(calls) == 3 and down.manifest()["inputs"]["up"]["fingerprint"] == up2.fingerprint


def test_force_recomputes(tmp_path):
    calls = []
    Run("t", root=tmp_path, quiet=True).stage("s", {}, _writer(calls))
    Run("t", root=tmp_path, force=["s"], quiet=True).stage("s", {}, _writer(calls))
    assert len(calls) == 2


def test_a_failing_build_leaves_nothing_and_keeps_the_old_artifact(tmp_path):
    run = Run("t", root=tmp_path, quiet=True)
    run.stage("s", {"v": 1}, _writer([], "old"))

    def boom(out):
        (out / "file.txt").write_text("half")
        raise KeyboardInterrupt  # a kill in the middle of a stage

    with pytest.raises(KeyboardInterrupt):
        run.stage("s", {"v": 2}, boom)
    assert (tmp_path / "s" / "file.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp directory left behind
    calls = []
    run.stage("s", {"v": 2}, _writer(calls, "new"))  # resume: the stage is rebuilt, not trusted
    assert calls and (tmp_path / "s" / "file.txt").read_text() == "new"


def test_directory_without_manifest_is_not_trusted(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "file.txt").write_text("stale")
    calls = []
    Run("t", root=tmp_path, quiet=True).stage("s", {}, _writer(calls))
    assert calls and json.loads((tmp_path / "s" / MANIFEST).read_text())["stage"] == "s"


@pytest.mark.parametrize("name", ["", "/abs", "a/../b"])
def test_invalid_stage_names(tmp_path, name):
    with pytest.raises(ValueError, match="invalid stage name"):
        Run("t", root=tmp_path, quiet=True).stage(name, {}, _writer([]))


def test_atomic_writes_replace_whole_files(tmp_path):
    path = tmp_path / "d" / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_text(path, "{\"a\": 2}")
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["x.json"]


def test_under_a_launcher_only_rank_zero_finalises(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run = Run("t", root=tmp_path, quiet=True)
    run.stage("s", {}, _writer([]))
    assert not (tmp_path / "s").exists()  # rank 1 built its share into the shared temp dir only
    monkeypatch.setenv("RANK", "0")
    art = run.stage("s", {}, _writer([]))
    assert (art.path / MANIFEST).is_file() and [p.name for p in tmp_path.iterdir()] == ["s"]
