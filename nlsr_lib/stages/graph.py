"""The stage graph's vocabulary (DESIGN.md §2): stage kinds with their declared reads and versions, the models under
test that stages pass along, and :func:`request`, the one way a stage asks the cache for its artifact.

A stage kind is registered in :data:`STAGES` with

* ``reads``: the params fields or sections its build reads, dotted (``"attack.train"``, ``"lora"``), optionally
  with ``{arg}`` placeholders filled from the request's arguments (``"alignment.{method}"``);
* ``version``: bumped when the code of the build changes what it writes;
* ``consumes``: the upstream kinds it takes artifacts from (for ``nlsr stage list``; the edges themselves are the
  ``inputs`` of each request);
* ``device``: ``gpu`` when its build runs a model forward or backward (an executor gives it one accelerator where
  there are any), ``cpu`` otherwise.

The fingerprint of a request (:func:`nlsr_lib.runs.fingerprint`) hashes the stage's name, its kind and version,
its arguments, the values of its declared reads and its upstream fingerprints, so a change of a field no stage
reads rebuilds nothing and a version bump rebuilds that stage and what depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..config import Params, to_dict
from ..registry import Registry
from ..runs import Artifact, Run, atomic_write_json


@dataclass(frozen=True)
class StageKind:
    name: str
    function: Callable
    version: int = 1
    reads: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    device: str = "cpu"
    args: tuple[str, ...] = ()  # the request's arguments, settable as key=value by `nlsr stage run`

    @property
    def doc(self) -> str:
        """The request function's docstring summary (first paragraph) on one line."""
        return " ".join((self.function.__doc__ or "").strip().split("\n\n")[0].split())


STAGES: Registry[StageKind] = Registry("stage", make=lambda name, fn, **meta: StageKind(name, fn, **meta))


def stage_kind(name: str, *, version: int = 1, reads: Iterable[str] = (), consumes: Iterable[str] = (),
               device: str = "cpu", args: Iterable[str] = ()):
    """Decorator: register a request function ``fn(params, run, **args)`` as the stage kind ``name``."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"stage {name!r}: device {device!r}; allowed: cpu, gpu")
    return STAGES.register(name, version=version, reads=tuple(reads), consumes=tuple(consumes), device=device,
                           args=tuple(args))


def read(params: Params, path: str) -> Any:
    """The JSON-able value of the dotted params field ``path`` (a section becomes a dict)."""
    value: Any = params
    for part in path.split("."):
        if not dataclasses.is_dataclass(value) or not hasattr(value, part):
            raise KeyError(f"stage reads {path!r}, which is not a params field")
        value = getattr(value, part)
    return to_dict(value)


def request(params: Params, run: Run, kind: str, name: str, build: Callable[[Path], Mapping[str, Any] | None], *,
            args: Mapping[str, Any] | None = None, inputs: Mapping[str, Artifact] | None = None,
            reads: Iterable[str] = (), values: Mapping[str, Any] | None = None,
            counts: Mapping[str, int] | None = None, distributed_build: bool = False) -> Artifact:
    """The artifact ``name`` of stage kind ``kind``, from the cache or built by ``build(out_dir)``.

    Its config is the kind's version, ``args``, the values of the kind's declared reads plus ``reads`` (both with
    ``{arg}`` placeholders filled from ``args``), and ``values``: settings that are not params fields (a content
    hash, a derived count)."""
    spec = STAGES[kind]
    args = dict(args or {})
    paths = [p.format(**args) for p in (*spec.reads, *reads)]
    config = {"kind": kind, "version": spec.version, "args": args, "reads": {p: read(params, p) for p in paths},
              "values": dict(values or {})}
    if spec.device == "gpu" and kind not in EVALUATION_KINDS:
        build = _releasing_kept_models(build)
    return run.stage(name, config, build, inputs, distributed_build=distributed_build, kind=kind, counts=counts,
                     device=spec.device)


EVALUATION_KINDS = frozenset({"generations", "benchmark_generations", "accuracy", "calibration", "judge", "capability"})
"""Stage kinds served by the models a process keeps (the generation engine's bases, the moderation judge)."""


def _releasing_kept_models(build: Callable[[Path], Mapping[str, Any] | None]):
    """``build`` preceded by freeing the kept evaluation models: a training gets the GPU memory they hold."""
    def build_with_memory(out: Path) -> Mapping[str, Any] | None:
        from ..evaluate import release_models

        release_models()
        return build(out)

    return build_with_memory


# --------------------------------------------------------------------------------------------- models under test
POINTER = "location.json"


def write_pointer(directory: Path, location: str) -> dict:
    """Artifacts of real profiles that only name a hub id or path (nothing is downloaded into the run); where a
    model lives is known from params at request time (:func:`nlsr_lib.stages.world.base_location`), so planning
    never reads an artifact."""
    atomic_write_json(directory / POINTER, {"location": location})
    return {"location": location}


@dataclass(frozen=True)
class ModelRef:
    """A model under test: a base directory (or hub id), an optional adapter on it, and the artifact that
    produced it (its fingerprint keys the evaluation caches). ``tag`` names it in stage paths and tables."""

    tag: str
    base: str
    adapter: str | None
    artifact: Artifact


def content_hash(path: str | Path) -> str:
    """sha256 of a local file (its suffix, which decides how it is parsed, and its bytes) or of every file under a
    local directory (relative names and bytes), so a local data source is keyed by what it holds, not by where."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.suffix).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
