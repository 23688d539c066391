"""Stage cache: hits on identical inputs, recompute on change or force, nothing half-written is trusted."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from nlsr_lib.runs import _HOST, MANIFEST, STALE_SECONDS, Run, atomic_write_json, atomic_write_text


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


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_run_sweeps_what_killed_builds_left_behind(tmp_path):
    dead, live, old = _dead_pid(), os.getpid(), time.time() - STALE_SECONDS - 60
    tmp = {  # name -> (should be removed, age)
        f".tmp-s-{dead}@{_HOST}-0123abcd": (True, None),  # a killed build on this host
        f"align/.old-dpo-{dead}@{_HOST}-0123abcd": (True, None),  # killed while deleting a replaced artifact
        f"align/.tmp-kto-{live}@{_HOST}-0123abcd": (False, old),  # a live build (here: this process), however old
        f".tmp-u-{dead}@elsewhere-0123abcd": (False, None),  # another host's: cannot tell, recent
        f".tmp-u2-{dead}@elsewhere-0123abcd": (True, old),  # ... untouched for too long
        ".tmp-v-4bd086b3": (False, None),  # named before owners were recorded, recent
        ".tmp-w-4bd086b3": (True, old),  # ... stale
        f".tmp-x-{'a' * 12}": (True, old),  # shared by the ranks of a launcher, stale
        f"s/.manifest.json.{dead}@{_HOST}-0123abcd.tmp": (True, None),  # a killed atomic_write_text
        "s/.results.json.ab_cd123.tmp": (True, old),  # a killed mkstemp-style write, stale
        f"s/.results.json.{live}@{_HOST}-0123abcd.tmp": (False, None),  # a write in progress
    }
    for name, (_, age) in tmp.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".tmp"):
            path.write_text("half")
        else:
            path.mkdir()
            (path / "weights.bin").write_text("half")
            if age:
                os.utime(path / "weights.bin", (age, age))
        if age:
            os.utime(path, (age, age))
    (tmp_path / "s" / MANIFEST).write_text("{}")
    run = Run("t", root=tmp_path, quiet=True)
    removed = {str(p.relative_to(tmp_path)) for p in run.swept}
    assert removed == {name for name, (gone, _) in tmp.items() if gone}
    assert all((tmp_path / name).exists() != gone for name, (gone, _) in tmp.items())
    assert (tmp_path / "s" / MANIFEST).is_file()


def test_a_recent_write_deep_inside_keeps_an_unverifiable_leftover(tmp_path):
    old = time.time() - STALE_SECONDS - 60
    path = tmp_path / ".tmp-long-0123abcd"
    (path / "checkpoint-9").mkdir(parents=True)
    (path / "checkpoint-9" / "step.json").write_text("{}")  # a long training still writing, deep inside
    os.utime(path, (old, old))
    assert Run("t", root=tmp_path, quiet=True).swept == [] and path.is_dir()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask_so_a_group_can_read_them(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.md", "| a |\n")
        art = Run("t", root=tmp_path, quiet=True).stage("s", {}, _writer([]))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.md").stat().st_mode) == mode
    assert stat.S_IMODE((art.path / MANIFEST).stat().st_mode) == mode
