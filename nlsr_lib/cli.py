"""The ``nlsr`` console script: ``reproduce``, ``stage`` and ``params``.

* ``nlsr reproduce --params params/tiny.yaml [--only 01] [--from 02]`` runs the notebooks with papermill.
* ``nlsr stage NAME --params FILE [--method M] [--force]`` runs one stage (under ``accelerate launch`` for
  multi-GPU training); stage names come from :data:`STAGES`.
* ``nlsr params FILE`` validates a params file and prints it fully resolved.
* ``nlsr bench NAME [ARGS...]`` runs one benchmark of ``benchmarks/NAME.py`` (its ``main(argv)``); the
  benchmark prints one JSON object as its last line. ``nlsr bench all`` runs every one in turn.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Callable

from .config import ParamsError, dump_params, load_params


def _stage(fn_name: str, needs_method: bool = False) -> Callable:
    def call(params, run, args):
        from . import pipeline

        fn = getattr(pipeline, fn_name)
        if needs_method:
            if not args.method:
                raise SystemExit(f"stage {args.name} needs --method (one of {', '.join(params.alignment.methods)})")
            return fn(params, run, args.method)
        return fn(params, run)

    return call


STAGES: dict[str, Callable] = {
    "world": _stage("world_stage"),
    "tokenizer": _stage("tokenizer_stage"),
    "base_model": _stage("base_model_stage"),
    "moderation": _stage("moderation_stage"),
    "align": _stage("align_stage", needs_method=True),
}


def benchmark_names() -> list[str]:
    """Benchmarks are the modules ``benchmarks/NAME.py`` beside the package (files starting with ``_`` excluded)."""
    from .paths import PROJECT_ROOT

    return sorted(p.stem for p in (PROJECT_ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def run_benchmark(name: str, argv: list[str]) -> int:
    """Import ``benchmarks/<name>.py`` by path and call its ``main(argv)``."""
    from .paths import PROJECT_ROOT

    names = benchmark_names()
    if name not in names:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    path = PROJECT_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"nlsr_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nlsr", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run the notebooks headless with papermill")
    rep.add_argument("--params", default="params/tiny.yaml")
    rep.add_argument("--only", help="run only this notebook number, e.g. 01")
    rep.add_argument("--from", dest="start", help="start at this notebook number, e.g. 03")

    st = sub.add_parser("stage", help="run one pipeline stage")
    st.add_argument("name", choices=sorted(STAGES))
    st.add_argument("--params", default="params/tiny.yaml")
    st.add_argument("--method", help="alignment method for the align stage")
    st.add_argument("--force", action="store_true", help="recompute this stage even if cached")

    pa = sub.add_parser("params", help="validate a params file and print it resolved")
    pa.add_argument("file")

    be = sub.add_parser("bench", help="run a benchmark of benchmarks/ (last line: one JSON object)")
    be.add_argument("name", help="benchmark name (a file of benchmarks/), or 'all'")
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            names = benchmark_names() if args.name == "all" else [args.name]
            return max((run_benchmark(name, args.bench_args) for name in names), default=0)
        if args.command == "params":
            print(dump_params(load_params(args.file)), end="")
            return 0
        if args.command == "reproduce":
            from .reproduce import NotebookFailure, reproduce

            try:
                timings = reproduce(args.params, only=args.only, start=args.start, progress=True)
            except NotebookFailure as failure:
                print(f"[nlsr] FAILED: {failure}", file=sys.stderr)
                return 1
            for name, seconds in timings:
                print(f"[nlsr] {name}: {seconds:.1f}s")
            return 0
        from .runs import Run

        params = load_params(args.params)
        stage_name = f"align/{args.method}" if args.name == "align" and args.method else args.name
        run = Run(params.profile, force=[stage_name] if args.force else [])
        artifact = STAGES[args.name](params, run, args)
        print(f"[nlsr] {artifact.stage}: {artifact.path}")
        return 0
    except ParamsError as err:
        print(f"[nlsr] invalid params: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
