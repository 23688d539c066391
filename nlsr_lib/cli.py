"""The ``nlsr`` console script: ``reproduce``, ``stage``, ``params`` and ``bench``.

* ``nlsr reproduce --params params/tiny.yaml [--only 01] [--from 02]`` runs the notebooks with papermill.
* ``nlsr stage NAME --params FILE [--method M] [--force]`` runs one stage (under ``accelerate launch`` for
  multi-GPU training); stage names come from :data:`STAGES`. ``nlsr stage list`` lists them, one line each.
* ``nlsr params FILE`` validates a params file and prints it fully resolved: local data sources as absolute
  paths, each checked to exist, to cover the splits its dataset needs and to carry its columns (headers only).
* ``nlsr cache ls|gc --params FILE`` lists the profile's cached artifacts / removes what killed builds left.
* ``nlsr bench NAME [ARGS...]`` runs one benchmark of ``benchmarks/NAME.py`` (its ``main(argv)``); the
  benchmark prints one JSON object as its last line. ``nlsr bench all`` runs every one in turn.
* ``nlsr standin build OUT_DIR [--data DIR] [--corpus FILE]`` writes what ``params/standin.yaml`` needs beyond public
  data (:func:`nlsr_lib.standin.build_profile_assets`): real-format stand-ins of the paper's base model and judge
  (random weights, toy size, no download) in ``OUT_DIR/base`` and ``OUT_DIR/moderation``, and the synthetic world's
  BeaverTails and Alpaca in the hub schema in ``OUT_DIR/data``; ``make standin`` builds ``runs/standin/assets``.

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


LIST, RUN = "list", "run"  # ``nlsr stage list`` / ``nlsr stage run NAME``


def stage_lines() -> list[str]:
    """``nlsr stage list``: one line per stage kind: name, version, device, declared reads, docstring summary."""
    from .stages import STAGES

    width = max(map(len, STAGES))
    lines = []
    for name, kind in STAGES.items():
        reads = ", ".join(kind.reads) or "-"
        args = " ".join(f"{a}=…" for a in kind.args)
        lines.append(f"{name:<{width}}  v{kind.version} {kind.device:<3}  {kind.doc}\n{'':<{width}}  "
                     f"reads: {reads}{f'; arguments: {args}' if args else ''}")
    return lines


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

    st = sub.add_parser("stage", help="'nlsr stage list' lists the stage kinds; 'nlsr stage run NAME [key=value "
                                      "...]' builds one (under accelerate launch for multi-GPU training)")
    st.add_argument("action", choices=(LIST, RUN))
    st.add_argument("name", nargs="?", help="run: the stage kind (see nlsr stage list)")
    st.add_argument("pairs", nargs="*", metavar="key=value",
                    help="run: the stage's arguments (method=dpo task=sst2 p=0.1 model=attack:dpo:sst2:0.1 ...); a "
                         "dotted key overrides a params field (attack.n=200)")
    st.add_argument("--params", default="params/tiny.yaml")
    st.add_argument("--method", choices=ALIGNMENT_METHODS.names(), help="same as method=M")
    st.add_argument("--force", action="store_true", help="recompute this stage even if cached")

    pl = sub.add_parser("plan", help="the stages the notebooks need, with counts per kind (nothing is built)")
    pl.add_argument("--params", default="params/tiny.yaml")
    pl.add_argument("--only", help="plan only this notebook number: 01 ... 07")
    pl.add_argument("--json", action="store_true", help="one JSON object: totals, per kind, and every stage")
    pl.add_argument("--gpu-hours", action="store_true", help="estimate the GPU-hours of the stages not cached")
    pl.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="generation backend of the estimate")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs of the estimate's wall time")

    ru = sub.add_parser("run", help="build every stage the notebooks need, independent stages in parallel (Ray)")
    ru.add_argument("--params", default="params/tiny.yaml")
    ru.add_argument("--only", help="build only what this notebook needs: 01 ... 07")
    ru.add_argument("--executor", default="local", help="local (one process) or ray (one task per stage)")
    ru.add_argument("--workers", type=int, default=2, help="ray: CPUs of the local Ray started (default 2)")
    ru.add_argument("--address", help="ray: join the Ray cluster at this address instead of starting one")

    pa = sub.add_parser("params", help="validate a params file (and its local data files' splits and columns) "
                                         "and print it resolved")
    pa.add_argument("file")

    ca = sub.add_parser("cache", help="the stage cache of a profile: 'ls' lists its artifacts, 'gc' removes what "
                                      "killed builds left behind and the artifacts no notebook reaches under "
                                      "these params")
    ca.add_argument("action", choices=("ls", "gc"))
    ca.add_argument("--params", default="params/tiny.yaml")
    ca.add_argument("--json", action="store_true", help="ls: one JSON object per artifact")
    ca.add_argument("--dry-run", action="store_true", help="gc: only list what would be removed")

    be = sub.add_parser("bench", help="run a benchmark of benchmarks/ (last line: one JSON object)")
    be.add_argument("name", help="benchmark name (a file of benchmarks/), or 'all'")
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    sd = sub.add_parser("standin", help="'nlsr standin build OUT_DIR' writes the assets of params/standin.yaml: "
                                        "real-format stand-ins of the paper's models (random weights, no download) "
                                        "in OUT_DIR/base and OUT_DIR/moderation, the world's BeaverTails and Alpaca "
                                        "in OUT_DIR/data (make standin: runs/standin/assets)")
    sd.add_argument("action", choices=("build",))
    sd.add_argument("out_dir", help="replaced as a whole: absent, empty or an earlier stand-in build")
    sd.add_argument("--data", help="the public data folder whose SST-2, AG News, GSM8K and PKU-SafeRLHF files the "
                                   "profile reads, to train the tokenizers on (default: ../shared/data beside the "
                                   "repository when there is one)")
    sd.add_argument("--corpus", help="a UTF-8 text file, one text per line, to train the tokenizers on instead "
                                     "(default: the world's texts and the public data's)")
    sd.add_argument("--seed", type=int, default=0)
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
    if args.command == "standin":
        from .standin import build_profile_assets, default_data_dir, read_corpus

        texts = read_corpus(cli_path(args.corpus)) if args.corpus else None
        data = Path(args.data).expanduser() if args.data else default_data_dir()
        if data is None and texts is None:
            print("[nlsr] note: no public data folder (../shared/data) beside the repository: the tokenizers are "
                  "trained on the world's texts only", file=sys.stderr)
        for name, path in build_profile_assets(Path(args.out_dir), data, texts, seed=args.seed).items():
            print(f"[nlsr] {name}: {path}")
        return 0
    if args.command == "plan":
        return _plan(args)
    if args.command == "run":
        from .reproduce import NUMBERS, notebooks
        from .stages.executors import EXECUTORS, execute

        notebooks(args.only)  # a bad --only is refused before anything runs
        EXECUTORS[args.executor]
        if args.workers < 1:
            raise UsageError(f"--workers {args.workers}: must be at least 1")
        state["what"] = f"nlsr run --executor {args.executor}"
        built = execute(cli_path(args.params), [args.only] if args.only else NUMBERS, args.executor,
                        workers=args.workers, address=args.address)
        print(f"[nlsr] built {len(built)} stage(s)")
        return 0
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
    if args.action == LIST:
        print("\n".join(stage_lines()))
        return 0
    return _stage_run(args, state)


def _stage_run(args: argparse.Namespace, state: dict) -> int:
    """``nlsr stage run NAME [key=value ...]``: request one stage (built unless cached) and print where it is."""
    from .runs import Run
    from .stages import STAGES
    from .stages.commands import parse_pairs, run_stage

    if not args.name:
        raise UsageError(f"nlsr stage run needs a stage name; stages: {', '.join(STAGES)}")
    STAGES[args.name]
    stage_args, overrides = parse_pairs(args.pairs)
    if args.method:
        stage_args["method"] = args.method
    params = load_params(cli_path(args.params), overrides)
    state["what"], state["stage"] = f"stage {args.name}", args.name
    # plan first: bad arguments are refused before anything is created, and --force learns the stage's name
    target = run_stage(params, Run(params.profile, planning=True, quiet=True), args.name, stage_args)
    run = Run(params.profile, force=[getattr(target, "artifact", target).stage] if args.force else [])
    state["run"], state["search"] = run, [run.root]
    result = run_stage(params, run, args.name, stage_args)
    artifact = getattr(result, "artifact", result)
    print(f"[nlsr] {artifact.stage}: {artifact.path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``nlsr plan``: the table of stage kinds with their counts, or (``--json``) one JSON object; with
    ``--gpu-hours`` the estimate of :mod:`nlsr_lib.stages.estimate` instead."""
    import json

    from .reproduce import NUMBERS, notebooks
    from .stages.plan import collect, table, to_json

    notebooks(args.only)
    plan = collect(load_params(cli_path(args.params)), [args.only] if args.only else NUMBERS)
    if args.gpu_hours:
        from .stages.estimate import gpu_hours, report

        estimate = gpu_hours(plan, args.backend, args.gpus)
        print(json.dumps(estimate) if args.json else report(estimate))
        return 0
    print(json.dumps(to_json(plan)) if args.json else table(plan))
    return 0


def _cache(args: argparse.Namespace) -> int:
    """``nlsr cache ls``: one line per cached artifact (stage, fingerprint, size, build seconds, date) and a total;
    ``nlsr cache gc``: remove the temporary files and directories of killed builds, and every artifact that no
    notebook reaches under these params (``--dry-run``: only list them)."""
    import json

    from .paths import runs_dir
    from .runs import cached_artifacts, remove_unreachable, sweep_leftovers

    params = load_params(cli_path(args.params))
    root = runs_dir(params.profile)
    if not root.is_dir():
        print(f"[nlsr] no stage cache at {root}")
        return 0
    if args.action == "gc":
        from .stages.plan import collect

        reachable = set(collect(params).run.nodes)
        removed = sweep_leftovers(root, dry_run=args.dry_run)
        unreachable = remove_unreachable(root, reachable, dry_run=args.dry_run)
        for path in [*removed, *unreachable]:
            print(path)
        verb = "would remove" if args.dry_run else "removed"
        print(f"[nlsr] {verb} {len(removed)} leftover(s) and {len(unreachable)} unreachable artifact(s) under {root}")
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
