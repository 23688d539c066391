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


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_align_stage_under_accelerate_launch_with_two_processes(tmp_path, entry):
    accelerate = Path(sys.executable).with_name("accelerate")
    target = ["-m", "nlsr_lib.cli"] if entry == "module" else [str(Path(sys.executable).with_name("nlsr"))]
    env = {**os.environ, "NLSR_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "NLSR_PROGRESS": "off"}
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", *target,
           "stage", "align", "--method", "dpo", "--params", "params/smoke.yaml"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    finals = [line for line in done.stdout.splitlines() if line.startswith("[nlsr] align/dpo: /")]
    assert len(finals) == 2, done.stdout[-2000:]  # both ranks ran the command and got the same artifact
    runs = tmp_path / "runs" / "smoke"
    manifest = json.loads((runs / "align" / "dpo" / "manifest.json").read_text())
    assert manifest["summary"]["steps"] >= 1 and (runs / "align" / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (runs / "align" / "sft" / "merged" / "config.json").is_file()  # rank 0 merged W_sft once
    assert not [p for p in runs.rglob(".tmp-*")]  # nothing temporary left behind
    # a single process afterwards finds every stage cached
    os.environ["NLSR_HOME"] = str(tmp_path)
    try:
        assert main(["stage", "align", "--method", "dpo", "--params", str(REPO / "params/smoke.yaml")]) == 0
    finally:
        os.environ.pop("NLSR_HOME")
    assert json.loads((runs / "align" / "dpo" / "manifest.json").read_text())["created"] == manifest["created"]
