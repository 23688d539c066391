"""The ``nlsr`` console script: ``reproduce``, ``stage``, ``params`` and ``bench``.

* ``nlsr reproduce --params params/tiny.yaml [--only 01] [--from 02]`` runs the notebooks with papermill.
* ``nlsr stage NAME --params FILE [--method M] [--force]`` runs one stage (under ``accelerate launch`` for
  multi-GPU training); stage names come from :data:`STAGES`. ``nlsr stage list`` lists them, one line each.
* ``nlsr params FILE`` validates a params file and prints it fully resolved.
* ``nlsr cache ls|gc --params FILE`` lists the profile's cached artifacts / removes what killed builds left.
* ``nlsr bench NAME [ARGS...]`` runs one benchmark of ``benchmarks/NAME.py`` (its ``main(argv)``); the
  benchmark prints one JSON object as its last line. ``nlsr bench all`` runs every one in turn.

A params path typed here is looked up in the current directory first, then relative to the repository root
(nlsr_lib.config.resolve_params_path).

Exit status and messages:
  0    done.
  1    a notebook (or a benchmark) failed: one line naming the notebook, the failing cell's index in the source
       notebook, the error and the executed copy.
  2    a bad input, on one line on stderr, "[nlsr] error: ...": a params file (YAML syntax with its line, unknown
       key, value out of range), a command-line value (--only 1, --method dpoo), an unreadable file (a truncated
       .safetensors, named).
  130  interrupted (Ctrl-C; 128 + SIGINT, the shell's convention): one line saying what was running. Finished
       stages are cached, so running the same command again resumes where it stopped.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import dump_params, load_params
from .errors import Interrupted, NlsrError, UsageError, explain_unreadable_safetensors, one_line
from .names import ALIGNMENT_METHODS
from .registry import Registry

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


@dataclass(frozen=True)
class CliStage:
    """A stage the command line runs: the function ``function`` of :mod:`nlsr_lib.pipeline`."""

    function: str
    needs_method: bool = False

    def stage_function(self):
        from . import pipeline

        return getattr(pipeline, self.function)

    @property
    def doc(self) -> str:
        """The stage function's docstring summary (its first paragraph) on one line."""
        return one_line((self.stage_function().__doc__ or "").strip().split("\n\n")[0])

    def __call__(self, params, run, args):
        fn = self.stage_function()
        if self.needs_method:
            if not args.method:
                raise UsageError(f"stage {args.name} needs --method (one of {', '.join(params.alignment.methods)})")
            if args.method not in params.alignment.methods:
                raise UsageError(f"--method {args.method}: not among alignment.methods of this profile; choose one "
                                 f"of {', '.join(params.alignment.methods)}")
            return fn(params, run, args.method)
        if args.method:
            raise UsageError(f"stage {args.name} takes no --method (only align does)")
        return fn(params, run)


STAGES: Registry[CliStage] = Registry("stage")
STAGES.register("world", CliStage("world_stage"))
STAGES.register("tokenizer", CliStage("tokenizer_stage"))
STAGES.register("base_model", CliStage("base_model_stage"))
STAGES.register("moderation", CliStage("moderation_stage"))
STAGES.register("align", CliStage("align_stage", needs_method=True))
LIST = "list"  # ``nlsr stage list``


def stage_lines() -> list[str]:
    """``nlsr stage list``: one line per stage, its name and its function's docstring summary."""
    width = max(map(len, STAGES))
    return [f"{name:<{width}}  {stage.doc}" for name, stage in STAGES.items()]


def cli_path(path: str) -> str:
    """A path typed on the command line: the file relative to the shell's current directory when there is one
    there (absolute from then on), otherwise unchanged, for :func:`nlsr_lib.config.resolve_params_path`."""
    p = Path(path).expanduser()
    return str(p.resolve()) if not p.is_absolute() and p.is_file() else path


def benchmark_names() -> list[str]:
    """Benchmarks are the modules ``benchmarks/NAME.py`` beside the package (files starting with ``_`` excluded)."""
    from .paths import PROJECT_ROOT

    return sorted(p.stem for p in (PROJECT_ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def run_benchmark(name: str, argv: list[str]) -> int:
    """Import ``benchmarks/<name>.py`` by path and call its ``main(argv)``."""
    from .paths import PROJECT_ROOT

    names = benchmark_names()
    if name not in names:
        raise UsageError(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}, or all")
    path = PROJECT_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"nlsr_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"[nlsr] error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nlsr", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run the notebooks headless with papermill")
    rep.add_argument("--params", default="params/tiny.yaml")
    rep.add_argument("--only", help="run only this notebook number: 01 ... 07")
    rep.add_argument("--from", dest="start", help="start at this notebook number: 01 ... 07")

    st = sub.add_parser("stage", help="run one pipeline stage ('nlsr stage list' lists them)")
    st.add_argument("name", choices=[*sorted(STAGES), LIST], help="a stage, or 'list' to list the stages")
    st.add_argument("--params", default="params/tiny.yaml")
    st.add_argument("--method", choices=ALIGNMENT_METHODS.names(), help="alignment method of the align stage")
    st.add_argument("--force", action="store_true", help="recompute this stage even if cached")

    pa = sub.add_parser("params", help="validate a params file and print it resolved")
    pa.add_argument("file")

    ca = sub.add_parser("cache", help="the stage cache of a profile: 'ls' lists its artifacts, 'gc' removes what "
                                      "killed builds left behind")
    ca.add_argument("action", choices=("ls", "gc"))
    ca.add_argument("--params", default="params/tiny.yaml")
    ca.add_argument("--json", action="store_true", help="ls: one JSON object per artifact")
    ca.add_argument("--dry-run", action="store_true", help="gc: only list what would be removed")

    be = sub.add_parser("bench", help="run a benchmark of benchmarks/ (last line: one JSON object)")
    be.add_argument("name", help="benchmark name (a file of benchmarks/), or 'all'")
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _error(message: object) -> None:
    print(f"[nlsr] error: {one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state: dict = {"what": f"nlsr {args.command}", "stage": None, "run": None, "search": []}
    try:
        return _dispatch(args, state)
    except KeyboardInterrupt as err:
        run = state["run"]
        what = getattr(err, "what", None) if isinstance(err, Interrupted) else None
        if what is None and run is not None and run.interrupted and run.interrupted != state["stage"]:
            what = f"{state['what']} (while building stage {run.interrupted})"
        print(f"[nlsr] interrupted: {what or state['what']}. Finished stages are cached: run the same command "
              "again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NlsrError as err:
        _error(err)
        return EXIT_USAGE
    except Exception as err:
        explained = explain_unreadable_safetensors(err, search=state["search"])
        if explained is None:
            raise
        _error(explained)
        return EXIT_USAGE


def _dispatch(args: argparse.Namespace, state: dict) -> int:
    if args.command == "bench":
        names = benchmark_names() if args.name == "all" else [args.name]
        status = 0
        for name in names:
            state["what"] = f"benchmark {name}"
            status = max(status, run_benchmark(name, args.bench_args))
        return status
    if args.command == "params":
        print(dump_params(load_params(cli_path(args.file))), end="")
        return 0
    if args.command == "cache":
        return _cache(args)
    if args.command == "reproduce":
        from .reproduce import NotebookFailure, notebooks, reproduce

        notebooks(args.only, args.start)  # a bad --only/--from is refused before anything runs
        state["what"] = "nlsr reproduce"
        try:
            timings = reproduce(cli_path(args.params), only=args.only, start=args.start, progress=True)
        except NotebookFailure as failure:
            print(f"[nlsr] FAILED: {one_line(failure)}", file=sys.stderr)
            return EXIT_FAILED
        for name, seconds in timings:
            print(f"[nlsr] {name}: {seconds:.1f}s")
        return 0
    if args.name == LIST:
        print("\n".join(stage_lines()))
        return 0
    from .runs import Run

    params = load_params(cli_path(args.params))
    stage_name = f"align/{args.method}" if args.name == "align" and args.method else args.name
    state["what"], state["stage"] = f"stage {stage_name}", stage_name
    run = Run(params.profile, force=[stage_name] if args.force else [])
    state["run"], state["search"] = run, [run.root]
    artifact = STAGES[args.name](params, run, args)
    print(f"[nlsr] {artifact.stage}: {artifact.path}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    """``nlsr cache ls``: one line per cached artifact (stage, fingerprint, size, build seconds, date) and a total;
    ``nlsr cache gc``: remove the temporary files and directories of killed builds."""
    import json

    from .paths import runs_dir
    from .runs import cached_artifacts, sweep_leftovers

    root = runs_dir(load_params(cli_path(args.params)).profile)
    if not root.is_dir():
        print(f"[nlsr] no stage cache at {root}")
        return 0
    if args.action == "gc":
        removed = sweep_leftovers(root, dry_run=args.dry_run)
        for path in removed:
            print(path)
        print(f"[nlsr] {'would remove' if args.dry_run else 'removed'} {len(removed)} leftover(s) under {root}")
        return 0
    records = cached_artifacts(root)
    for r in records:
        print(json.dumps(r) if args.json else
              f"{r['stage']:<60} {r['fingerprint'][:12]}  {r['bytes'] / 2**20:9.1f} MiB  {r['seconds'] or 0:8.1f} s  "
              f"{r['created']}")
    if not args.json:
        total = sum(r["bytes"] for r in records) / 2**20
        print(f"[nlsr] {len(records)} artifacts, {total:.1f} MiB under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
