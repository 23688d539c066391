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


def test_a_failing_build_leaves_nothing_and_keeps_the_other_artifacts(tmp_path):
    run = Run("t", root=tmp_path, quiet=True)
    old = run.stage("s", {"v": 1}, _writer([], "old"))

    def boom(out):
        (out / "file.txt").write_text("half")
        raise KeyboardInterrupt  # a kill in the middle of a stage

    with pytest.raises(KeyboardInterrupt):
        run.stage("s", {"v": 2}, boom)
    assert (old.path / "file.txt").read_text() == "old"
    assert [p.name for p in (tmp_path / "s").iterdir()] == [old.path.name]  # no temp directory left behind
    calls = []
    new = run.stage("s", {"v": 2}, _writer(calls, "new"))  # resume: the stage is rebuilt, not trusted
    assert calls and (new.path / "file.txt").read_text() == "new"
    assert (old.path / "file.txt").read_text() == "old"  # addressed by fingerprint: both settings are kept


def test_artifacts_are_addressed_by_fingerprint(tmp_path):
    run = Run("t", root=tmp_path, quiet=True)
    a, b = (run.stage("s", {"v": v}, _writer([], str(v))) for v in (1, 2))
    assert a.path == tmp_path / "s" / a.fingerprint[:16] and b.path == tmp_path / "s" / b.fingerprint[:16]
    assert a.path != b.path and run.stage("s", {"v": 1}, _writer([])).cached  # switching back rebuilds nothing


def test_directory_without_manifest_is_not_trusted(tmp_path):
    run = Run("t", root=tmp_path, quiet=True)
    planned = Run("t", root=tmp_path, quiet=True, planning=True).stage("s", {}, _writer([]))
    planned.path.mkdir(parents=True)
    (planned.path / "file.txt").write_text("stale")
    calls = []
    built = run.stage("s", {}, _writer(calls))
    assert built.path == planned.path and calls and json.loads((built.path / MANIFEST).read_text())["stage"] == "s"


def test_a_planning_run_records_nodes_and_builds_them_on_request(tmp_path):
    planner = Run("t", root=tmp_path, quiet=True, planning=True)
    calls = []
    up = planner.stage("up", {"v": 1}, _writer(calls, "u"), counts={"trainings": 1})
    down = planner.stage("down", {}, lambda out: (out / "x").write_text((up.path / "file.txt").read_text()) and {},
                         inputs={"up": up})
    assert calls == [] and not any(tmp_path.rglob("*.txt"))  # nothing built, nothing read
    assert [n.stage for n in planner.nodes.values()] == ["up", "down"]  # inputs first
    assert planner.nodes[down.fingerprint].upstream == [up.fingerprint]
    assert planner.nodes[up.fingerprint].counts == {"trainings": 1} and not planner.nodes[up.fingerprint].cached
    for node in planner.nodes.values():
        planner.build_node(node)
    assert (down.path / "x").read_text() == "u" and planner.planning  # built where the plan said, still planning
    assert Run("t", root=tmp_path, quiet=True).stage("down", {}, _writer(calls), inputs={"up": up}).cached


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


RANK_SCRIPT = """
import json, sys
from pathlib import Path
from nlsr_lib.runs import Run
from nlsr_lib import distributed

root, rank = Path(sys.argv[1]), distributed.rank()
run = Run("t", root=root, quiet=True)
log = root.parent / f"log{rank}.jsonl"

def note(what):
    with open(log, "a") as fh:
        fh.write(json.dumps(what) + "\\n")

def nested(out):
    note("nested")
    (out / "n.txt").write_text("n")

def local(out):  # rank 0 alone; a stage nested in it must not wait for the other rank
    note("local")
    run.stage("inner", {}, nested)
    (out / "l.txt").write_text("l")

def trained(out):  # every rank, one shared directory
    note("trained")
    (out / f"rank{rank}.txt").write_text(str(rank))

a = run.stage("local", {"x": 1}, local)
b = run.stage("trained", {"x": 1}, trained, distributed_build=True)
c = run.stage("local", {"x": 1}, local)  # cached on every rank
print(json.dumps([str(a.path), str(b.path), c.cached, sorted(p.name for p in b.path.iterdir())]))
"""


def test_under_a_launcher_rank_zero_builds_local_stages_and_every_rank_trains(tmp_path):
    """Two real processes (gloo): a local stage (with a stage nested in its build) is built once, by rank 0, and
    the other rank reads it; a distributed build runs on both ranks into one directory that rank 0 finalises."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "runs"
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(root)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1]  # the same artifacts on both ranks
    local, trained, cached, files = results[0]
    assert cached and files == ["manifest.json", "rank0.txt", "rank1.txt"]
    logs = {r: (tmp_path / f"log{r}.jsonl").read_text().split() for r in (0, 1)}
    assert logs[0] == ['"local"', '"nested"', '"trained"'] and logs[1] == ['"trained"']
    assert sorted(p.name for p in root.iterdir()) == ["inner", "local", "trained"]  # nothing temporary left


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
    assert (tmp_path / "s" / MANIFEST).is_file()  # a finished artifact is never a leftover


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
