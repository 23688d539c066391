"""Benchmark: the Ray executor against the local one on the same plan from an empty cache (issue 14).

By default: the stages notebook 02 needs on ``params/tiny.yaml`` (the world, the tiny model and judge, every
alignment, every attack of the ratio / method / size sweeps and their evaluations), built twice from an empty cache
in two temporary ``NLSR_HOME`` directories:

* ``local_s``: ``nlsr run --executor local`` (one process; torch uses every core);
* ``ray_s``: ``nlsr run --executor ray --workers N`` (a local Ray with N CPUs, one stage per task, one thread each).

Both runs are child processes of this one, timed end to end (imports, Ray start-up and shutdown included).
``ratio_vs_local`` = ray_s / local_s (< 1: Ray is faster). ``same_summaries`` checks the two caches hold the same
artifacts (fingerprints) with the same manifest summaries (losses, scores, accuracies). Prints progress, then one
JSON object as its last line. ``--params``/``--only``/``--workers`` choose another plan (the test runs smoke, 01).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nlsr bench executors", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--only", default="02", help="the notebook whose stages are built (default 02)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="build into DIR/local and DIR/ray and keep them (default: temporary, removed)")
    return ap.parse_args(argv)


def timed_run(executor: str, home: Path, args: argparse.Namespace) -> float:
    """Seconds of ``nlsr run`` with ``executor`` into an empty ``home``."""
    nlsr = Path(sys.executable).with_name("nlsr")
    cmd = [str(nlsr), "run", "--params", args.params, "--only", args.only, "--executor", executor]
    if executor == "ray":
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "NLSR_HOME": str(home), "NLSR_PROGRESS": "off"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"nlsr run --executor {executor} failed:\n{done.stderr[-3000:]}")
    print(f"[bench] {executor}: {seconds:.1f}s ({done.stdout.strip().splitlines()[-1]})", flush=True)
    return seconds


def summaries(home: Path) -> dict[str, dict]:
    """Fingerprint → manifest summary of every artifact built under ``home``."""
    out = {}
    for manifest in (home / "runs").rglob("manifest.json"):
        record = json.loads(manifest.read_text())
        out[record["fingerprint"]] = record["summary"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv or [])
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(args.keep) if args.keep else Path(scratch)
        homes = {name: base / name for name in ("local", "ray")}
        for home in homes.values():
            home.mkdir(parents=True, exist_ok=False)  # an empty cache, or refuse
        local_s = timed_run("local", homes["local"], args)
        ray_s = timed_run("ray", homes["ray"], args)
        local, ray = summaries(homes["local"]), summaries(homes["ray"])
    result = {"benchmark": "executors", "params": args.params, "notebooks": args.only, "workers": args.workers,
              "cpus": os.cpu_count(), "stages": len(local), "local_s": round(local_s, 1), "ray_s": round(ray_s, 1),
              "ratio_vs_local": round(ray_s / local_s, 3), "same_summaries": local == ray}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
