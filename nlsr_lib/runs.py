"""Run directory and stage cache (DESIGN.md §2).

Every stage writes one artifact directory ``runs/<profile>/<stage>/`` containing its files and a
``manifest.json`` with the stage's resolved config, the fingerprints of its inputs and its own fingerprint
``sha256(stage, config, inputs)``. A stage is built in a temporary sibling directory and renamed into place
only when complete, so a killed run never leaves a directory the cache would trust; the next call rebuilds
it. A later call with the same config and inputs returns the cached artifact; ``force`` recomputes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .paths import runs_dir

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A completed stage output: its directory and the fingerprint later stages depend on."""

    stage: str
    path: Path
    fingerprint: str
    cached: bool

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())


def fingerprint(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    payload = json.dumps({"stage": stage, "config": config, "inputs": dict(sorted(inputs.items()))},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Run:
    """The run directory of one profile and its stage cache."""

    def __init__(self, profile: str, root: Path | None = None, force: Iterable[str] = (), quiet: bool = False):
        self.profile = profile
        self.root = Path(root) if root is not None else runs_dir(profile)
        self.root.mkdir(parents=True, exist_ok=True)
        env_force = os.environ.get("NLSR_FORCE", "")
        self.force = set(force) | {s for s in env_force.split(",") if s}
        self.quiet = quiet
        self.log: list[tuple[str, bool, float]] = []  # (stage, cached, seconds)
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """An in-memory value computed once per Run (e.g. datasets loaded from an artifact)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def stage_dir(self, stage: str) -> Path:
        if not stage or stage.startswith("/") or ".." in stage.split("/"):
            raise ValueError(f"invalid stage name {stage!r}: use slash-separated names without '..'")
        return self.root / stage

    def lookup(self, stage: str, config: Mapping[str, Any], inputs: Mapping[str, Artifact]) -> Artifact | None:
        """The cached artifact for exactly this config and these inputs, or None."""
        fp = fingerprint(stage, config, {k: a.fingerprint for k, a in inputs.items()})
        path = self.stage_dir(stage)
        manifest = path / MANIFEST
        if stage in self.force or not manifest.is_file():
            return None
        try:
            recorded = json.loads(manifest.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            return None
        return Artifact(stage, path, fp, cached=True) if recorded == fp else None

    def stage(self, stage: str, config: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any] | None],
              inputs: Mapping[str, Artifact] | None = None) -> Artifact:
        """Return the artifact of ``stage``, building it with ``build(tmp_dir)`` unless cached.

        ``config`` is the JSON-able configuration that determines the output; ``inputs`` are upstream
        artifacts. ``build`` may return a dict of summary values that is stored in the manifest.
        """
        inputs = dict(inputs or {})
        cached = self.lookup(stage, config, inputs)
        if cached is not None:
            if not self.quiet and all(s != stage for s, _, _ in self.log):
                print(f"[nlsr] {stage}: cached ({cached.path})")
            self.log.append((stage, True, 0.0))
            return cached
        fp = fingerprint(stage, config, {k: a.fingerprint for k, a in inputs.items()})
        final = self.stage_dir(stage)
        final.parent.mkdir(parents=True, exist_ok=True)
        rank, world_size = _distributed_rank()
        # Under `accelerate launch` every rank builds into the same directory; rank 0 alone finalises it.
        suffix = fp[:12] if world_size > 1 else uuid.uuid4().hex[:8]
        tmp = final.parent / f".tmp-{final.name}-{suffix}"
        tmp.mkdir(exist_ok=world_size > 1)
        start = time.perf_counter()
        if not self.quiet:
            print(f"[nlsr] {stage}: building")
        try:
            summary = build(tmp) or {}
            if rank != 0:
                _barrier()
                return Artifact(stage, final, fp, cached=False)
            manifest = {
                "stage": stage,
                "fingerprint": fp,
                "config": config,
                "inputs": {k: {"stage": a.stage, "fingerprint": a.fingerprint} for k, a in inputs.items()},
                "summary": dict(summary),
                "seconds": round(time.perf_counter() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            atomic_write_json(tmp / MANIFEST, manifest)
            self._replace(tmp, final)
            if world_size > 1:
                _barrier()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        self.log.append((stage, False, seconds))
        if not self.quiet:
            print(f"[nlsr] {stage}: done in {seconds:.1f}s")
        return Artifact(stage, final, fp, cached=False)

    @staticmethod
    def _replace(tmp: Path, final: Path) -> None:
        """Swap ``tmp`` into ``final``; an older ``final`` is moved aside first and deleted after."""
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def built_summary(self) -> str:
        """The stages this ``Run`` computed (not taken from the cache), for a notebook's last line."""
        built = sorted({stage for stage, cached, _ in self.log if not cached})
        return ", ".join(built) or "none (all cached)"

    def summary(self, stage: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(stage) / MANIFEST).read_text())["summary"]
