"""Run directory and stage cache (DESIGN.md §2).

Every stage writes one artifact directory ``runs/<profile>/<stage>/<fingerprint[:16]>/`` containing its files and
a ``manifest.json`` with the stage's resolved config, the fingerprints of its inputs and its own fingerprint
``sha256(stage, config, inputs)``: artifacts are addressed by fingerprint, so two settings of one stage (an
ablation point, another params file) live side by side and neither replaces the other. A stage is built in a
temporary sibling directory and renamed into place only when complete, so a killed run never leaves a directory
the cache would trust; the next call rebuilds it. A later call with the same config and inputs returns the cached artifact; ``force`` recomputes.

A :class:`Run` created with ``planning=True`` builds nothing: every ``stage`` call records a :class:`Node` (its
fingerprint, upstream fingerprints, what it costs, and the build itself) and returns the artifact it *would* be, so
a whole notebook's requests can be collected as a graph (:mod:`nlsr_lib.stages.plan`) and built later, in any
order that respects the edges and by any process (:meth:`Run.build_node`).

What a killed run leaves behind is swept by the next :class:`Run` of the profile (:func:`sweep_leftovers`):
temporary names carry their owner, ``.tmp-<stage>-<pid>@<host>-<random>`` (also ``.old-…`` for a replaced
artifact being deleted, and ``.<file>.<pid>@<host>-<random>.tmp`` for :func:`atomic_write_text`), so one whose
process is dead on this host is removed at once; one that cannot be checked (another host, a build under a
launcher shared by several ranks, a name from before this rule) is removed once nothing in it changed for
:data:`STALE_SECONDS`. Files written by :func:`atomic_write_text` get the usual ``0666 & ~umask`` mode (0644),
not ``mkstemp``'s 0600, so a group can read manifests and results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import distributed
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


@dataclass
class Node:
    """A stage request recorded by a planning :class:`Run`: everything needed to build it later."""

    stage: str
    kind: str
    fingerprint: str
    path: Path
    config: Mapping[str, Any]
    inputs: dict[str, Artifact]
    build: Callable[[Path], Mapping[str, Any] | None]
    counts: dict[str, int]
    device: str = "cpu"
    distributed_build: bool = False

    @property
    def upstream(self) -> list[str]:
        return sorted({a.fingerprint for a in self.inputs.values()})

    @property
    def cached(self) -> bool:
        return _recorded_fingerprint(self.path) == self.fingerprint


def _recorded_fingerprint(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def fingerprint(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    payload = json.dumps({"stage": stage, "config": config, "inputs": dict(sorted(inputs.items()))},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


STALE_SECONDS = 2 * 24 * 3600  # a leftover whose owner cannot be checked is removed after this long untouched
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "host")
_OWNED = re.compile(r"[-.](?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)-[0-9a-f]{8}(?:\.tmp)?$")
_LEFTOVER_DIR = re.compile(r"^\.(?:tmp|old)-.+-(?:[0-9a-f]{8}|[0-9a-f]{12})$")  # pid@host names end likewise
_LEFTOVER_FILE = re.compile(r"^\..+\.(?:[a-z0-9_]{8}|\d+@[A-Za-z0-9._-]+-[0-9a-f]{8})\.tmp$")  # mkstemp's or ours


def _owner_tag() -> str:
    """``<pid>@<host>-<random>``: who made a temporary name, so a sweep can tell a live build from a dead one."""
    return f"{os.getpid()}@{_HOST}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    The file is created with mode ``0666 & ~umask`` (0644 under the usual umask), like any file a program writes,
    so a group sharing the run directory can read manifests and results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{_owner_tag()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; an absurd pid
        return True
    return True


def _newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` or anything under it (a long build may write deep inside)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except OSError:
                    pass
    return newest


def _is_abandoned(path: Path, now: float, stale_seconds: float) -> bool:
    """A leftover temporary name whose owner is dead (same host) or that nothing touched for ``stale_seconds``."""
    owned = _OWNED.search(path.name)
    if owned and owned["host"] == _HOST:
        return not _pid_alive(int(owned["pid"]))
    try:
        return now - _newest_mtime(path) > stale_seconds
    except OSError:
        return False


def sweep_leftovers(root: Path, stale_seconds: float = STALE_SECONDS, dry_run: bool = False) -> list[Path]:
    """Remove, anywhere under ``root``, the temporary directories (``.tmp-*``, ``.old-*``) and files (``.*.tmp``)
    of builds and writes that were killed; returns what was removed (``dry_run``: what would be). A temporary name
    of a live process, or of one that cannot be checked and changed within ``stale_seconds``, is kept (see the
    module docstring)."""
    removed: list[Path] = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            if _LEFTOVER_DIR.match(name):
                dirnames.remove(name)  # never descend into a temporary directory
                if _is_abandoned(here / name, now, stale_seconds):
                    if not dry_run:
                        shutil.rmtree(here / name, ignore_errors=True)
                    removed.append(here / name)
        for name in filenames:
            if _LEFTOVER_FILE.match(name) and _is_abandoned(here / name, now, stale_seconds):
                try:
                    if not dry_run:
                        (here / name).unlink()
                    removed.append(here / name)
                except OSError:
                    pass
    return removed


def cached_artifacts(root: Path) -> list[dict[str, Any]]:
    """A readable index of the finished artifacts under a run directory: one record per ``manifest.json``
    (temporary directories skipped) with the stage, its fingerprint, when it was built, how long it took and its
    size on disk, sorted by stage."""
    records = []
    for manifest in sorted(Path(root).rglob(MANIFEST)):
        directory = manifest.parent
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        records.append({"stage": recorded.get("stage", str(directory.relative_to(root))),
                        "fingerprint": recorded.get("fingerprint", ""), "created": recorded.get("created", ""),
                        "seconds": recorded.get("seconds"), "bytes": size})
    return sorted(records, key=lambda r: r["stage"])


def remove_unreachable(root: Path, reachable: set[str], dry_run: bool = False) -> list[Path]:
    """Remove every finished artifact under ``root`` whose fingerprint is not in ``reachable`` (the plan's); returns
    the artifact directories removed (``dry_run``: that would be). An artifact directory that holds other
    artifacts below it (a name of the layout before fingerprint addressing) loses only its own files."""
    removed = []
    for manifest in sorted(Path(root).rglob(MANIFEST)):
        directory = manifest.parent
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue
        if _recorded_fingerprint(directory) in reachable:
            continue
        removed.append(directory)
        if dry_run:
            continue
        nested = {child for child in directory.iterdir() if child.is_dir() and any(child.rglob(MANIFEST))}
        if not nested:
            shutil.rmtree(directory, ignore_errors=True)
            continue
        for child in directory.iterdir():
            if child not in nested:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    return removed


class Run:
    """The run directory of one profile and its stage cache."""

    def __init__(self, profile: str, root: Path | None = None, force: Iterable[str] = (), quiet: bool = False,
                 planning: bool = False):
        self.profile = profile
        self.root = Path(root) if root is not None else runs_dir(profile)
        env_force = os.environ.get("NLSR_FORCE", "")
        self.force = set(force) | {s for s in env_force.split(",") if s}
        self.quiet = quiet
        self.log: list[tuple[str, bool, float]] = []  # (stage, cached, seconds)
        self.interrupted: str | None = None  # the innermost stage a KeyboardInterrupt stopped (for its message)
        self._memo: dict[str, Any] = {}
        self.swept: list[Path] = []  # leftovers of killed builds removed on creation (rank 0 only)
        self.planning = planning
        self.nodes: dict[str, Node] = {}  # planning: fingerprint -> node, in request order
        if planning:  # a plan creates nothing on disk
            return
        self.root.mkdir(parents=True, exist_ok=True)
        distributed.init()  # under a launcher: the process group exists before any stage needs a barrier
        if distributed.is_main():
            self.swept = sweep_leftovers(self.root)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """An in-memory value computed once per Run (e.g. datasets loaded from an artifact)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def stage_dir(self, stage: str, fp: str) -> Path:
        """``<root>/<stage>/<fingerprint[:16]>``: where the artifact of ``stage`` with fingerprint ``fp`` lives."""
        if not stage or stage.startswith("/") or ".." in stage.split("/"):
            raise ValueError(f"invalid stage name {stage!r}: use slash-separated names without '..'")
        return self.root / stage / fp[:16]

    def lookup(self, stage: str, config: Mapping[str, Any], inputs: Mapping[str, Artifact]) -> Artifact | None:
        """The cached artifact for exactly this config and these inputs, or None."""
        fp = fingerprint(stage, config, {k: a.fingerprint for k, a in inputs.items()})
        path = self.stage_dir(stage, fp)
        if stage in self.force or _recorded_fingerprint(path) != fp:
            return None
        return Artifact(stage, path, fp, cached=True)

    def build_node(self, node: Node) -> Artifact:
        """Build (or find cached) a node recorded by a planning run, as the original request would have."""
        planning, self.planning = self.planning, False
        try:
            return self.stage(node.stage, node.config, node.build, node.inputs,
                              distributed_build=node.distributed_build)
        finally:
            self.planning = planning

    def stage(self, stage: str, config: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any] | None],
              inputs: Mapping[str, Artifact] | None = None, distributed_build: bool = False, *,
              kind: str = "", counts: Mapping[str, int] | None = None, device: str = "cpu") -> Artifact:
        """Return the artifact of ``stage``, building it with ``build(tmp_dir)`` unless cached.

        ``config`` is the JSON-able configuration that determines the output; ``inputs`` are upstream
        artifacts. ``build`` may return a dict of summary values that is stored in the manifest.

        Under a launcher (:mod:`nlsr_lib.distributed`) a local stage is built by rank 0 alone while the other ranks
        wait for its manifest on disk (no collective call, so ranks may reach a stage by different paths, e.g. a
        value one rank has memoised); a ``distributed_build`` (a training, which every rank reaches together) is
        built by every rank into one shared temporary directory between two barriers, and finalised by rank 0.

        ``kind``, ``counts`` and ``device`` describe the request for a planning run (:class:`Node`).
        """
        inputs = dict(inputs or {})
        if self.planning:
            fp = fingerprint(stage, config, {k: a.fingerprint for k, a in inputs.items()})
            path = self.stage_dir(stage, fp)
            if fp not in self.nodes:
                self.nodes[fp] = Node(stage, kind or stage.split("/")[0], fp, path, config, inputs, build,
                                      dict(counts or {}), device, distributed_build)
            return Artifact(stage, path, fp, cached=self.nodes[fp].cached)
        cached = self.lookup(stage, config, inputs)
        if cached is not None:
            if not self.quiet and all(s != stage for s, _, _ in self.log):
                print(f"[nlsr] {stage}: cached ({cached.path})")
            self.log.append((stage, True, 0.0))
            return cached
        fp = fingerprint(stage, config, {k: a.fingerprint for k, a in inputs.items()})
        final = self.stage_dir(stage, fp)
        launched = distributed.is_multiprocess()
        shared = launched and distributed_build
        if launched and not distributed.is_main() and not shared:
            return self._built_by_rank0(stage, final, fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{fp[:12] if shared else _owner_tag()}"
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # a shared name may hold a killed launch's half-written build
            tmp.mkdir()
        if shared:
            distributed.barrier()  # the shared directory exists before any rank writes into it
        start = time.perf_counter()
        if not self.quiet:
            print(f"[nlsr] {stage}: building")
        try:
            summary = build(tmp) or {}
            if shared:
                distributed.barrier()  # every rank's part of the build is written
            if distributed.is_main():
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
        except BaseException as err:
            if distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, KeyboardInterrupt) and self.interrupted is None:
                self.interrupted = stage
            raise
        if not distributed.is_main():
            return self._built_by_rank0(stage, final, fp)
        seconds = time.perf_counter() - start
        self.log.append((stage, False, seconds))
        if not self.quiet:
            print(f"[nlsr] {stage}: done in {seconds:.1f}s")
        return Artifact(stage, final, fp, cached=False)

    def _built_by_rank0(self, stage: str, final: Path, fp: str, poll_seconds: float = 0.2) -> Artifact:
        """Wait until rank 0 has finalised ``stage`` with fingerprint ``fp`` (a rank other than 0). If rank 0 fails,
        the launcher ends every rank, so the wait has no time limit of its own."""
        manifest = final / MANIFEST
        while True:
            try:
                if json.loads(manifest.read_text()).get("fingerprint") == fp:
                    break
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(poll_seconds)
        self.log.append((stage, False, 0.0))
        return Artifact(stage, final, fp, cached=False)

    @staticmethod
    def _replace(tmp: Path, final: Path) -> None:
        """Swap ``tmp`` into ``final``; an older ``final`` is moved aside first and deleted after."""
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{_owner_tag()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def built_summary(self) -> str:
        """The stages this ``Run`` computed (not taken from the cache), for a notebook's last line."""
        built = sorted({stage for stage, cached, _ in self.log if not cached})
        return ", ".join(built) or "none (all cached)"

