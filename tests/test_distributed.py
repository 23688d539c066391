"""One training stage over two processes under `accelerate launch` (gloo on this CPU machine), with the shipped
accelerate config: ranks wait for rank 0's local artifacts, every rank trains, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlsr_lib.cli import main

REPO = Path(__file__).resolve().parents[1]


def _artifact(runs: Path, stage: str) -> Path:
    (manifest,) = (runs / stage).glob("*/manifest.json")  # <stage>/<fingerprint[:16]>/
    return manifest.parent


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_align_stage_under_accelerate_launch_with_two_processes(tmp_path, entry):
    accelerate = Path(sys.executable).with_name("accelerate")
    target = ["-m", "nlsr_lib.cli"] if entry == "module" else [str(Path(sys.executable).with_name("nlsr"))]
    env = {**os.environ, "NLSR_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "NLSR_PROGRESS": "off"}
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", *target,
           "stage", "run", "align", "--method", "dpo", "--params", "params/smoke.yaml"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    finals = [line for line in done.stdout.splitlines() if line.startswith("[nlsr] align/dpo: /")]
    assert len(finals) == 2, done.stdout[-2000:]  # both ranks ran the command and got the same artifact
    runs = tmp_path / "runs" / "smoke"
    dpo = _artifact(runs, "align/dpo")
    manifest = json.loads((dpo / "manifest.json").read_text())
    assert manifest["summary"]["steps"] >= 1 and (dpo / "adapter" / "adapter_model.safetensors").is_file()
    assert (_artifact(runs, "align/sft") / "merged" / "config.json").is_file()  # rank 0 merged W_sft once
    assert not [p for p in runs.rglob(".tmp-*")]  # nothing temporary left behind
    # a single process afterwards finds every stage cached
    os.environ["NLSR_HOME"] = str(tmp_path)
    try:
        assert main(["stage", "run", "align", "--method", "dpo", "--params", str(REPO / "params/smoke.yaml")]) == 0
    finally:
        os.environ.pop("NLSR_HOME")
    assert json.loads((dpo / "manifest.json").read_text())["created"] == manifest["created"]


def test_the_issue_command_with_accelerate_cpu_flag(tmp_path):
    """The command of the issue, verbatim: ``accelerate launch --cpu --num_processes 2 -m nlsr_lib.cli stage run
    align --method dpo --params params/smoke.yaml`` (accelerate 1.15 starts one CPU process for ``--cpu`` without a
    multi-CPU config; the two-rank path is the test above)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "NLSR_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "NLSR_PROGRESS": "off"}
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "-m", "nlsr_lib.cli", "stage", "run", "align",
           "--method", "dpo", "--params", "params/smoke.yaml"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    dpo = _artifact(tmp_path / "runs" / "smoke", "align/dpo")
    assert (dpo / "adapter" / "adapter_model.safetensors").is_file() and f"[nlsr] align/dpo: {dpo}" in done.stdout
