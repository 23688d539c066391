"""Executors: build every pending node of a plan (``nlsr run --executor local|ray``).

* ``local``: one process, the nodes in dependency order (what the notebooks would do, minus the tables).
* ``ray``: each node is a Ray task that depends on the tasks of its inputs, with a resource request of one GPU for
  a ``gpu`` stage where the cluster has GPUs and one CPU otherwise, so independent trainings and evaluations run
  side by side. :func:`run_ray` starts a local Ray with ``workers`` CPUs (and the machine's GPUs) or joins the
  cluster at ``address``. A task receives the params file and a fingerprint, recomputes the plan in its worker
  (cheap: nothing is read) and builds that node through the same cache, so the artifacts are the local
  executor's, byte for byte where the computation is deterministic.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from ..config import load_params
from ..errors import NlsrError
from ..registry import Registry
from .plan import Plan, collect

Executor = Callable[..., list[tuple[str, float]]]
EXECUTORS: Registry[Executor] = Registry("executor")


def _say(line: str, quiet: bool) -> None:
    if not quiet:
        print(f"[nlsr] {line}", flush=True)


@EXECUTORS.register("local")
def run_local(plan: Plan, params_file: str, workers: int = 1, address: str | None = None,
              quiet: bool = False) -> list[tuple[str, float]]:
    """Build the pending nodes one after another in this process; returns ``(stage, seconds)`` per built node."""
    pending = plan.pending()
    built = []
    for i, node in enumerate(pending, 1):
        start = time.perf_counter()
        plan.run.build_node(node)
        built.append((node.stage, time.perf_counter() - start))
        _say(f"{node.stage}: built in {built[-1][1]:.1f}s ({i}/{len(pending)})", quiet)
    return built


_WORKER_PLANS: dict[tuple, Plan] = {}


def build_in_worker(params_file: str, numbers: tuple[str, ...], fingerprint: str, *upstream: str) -> tuple[str, float]:
    """A Ray task: build the node ``fingerprint`` of the plan of ``numbers`` under ``params_file`` (the plan is
    computed once per worker process). ``upstream`` are the results of the input tasks (only ordering)."""
    key = (params_file, numbers, os.environ.get("NLSR_HOME"))
    if key not in _WORKER_PLANS:
        _WORKER_PLANS[key] = collect(load_params(params_file), numbers)
    plan = _WORKER_PLANS[key]
    node = plan.run.nodes.get(fingerprint)
    if node is None:
        raise NlsrError(f"stage fingerprint {fingerprint[:16]} is not in the plan of {params_file} in this worker "
                        "(params or code differ between the driver and the workers)")
    start = time.perf_counter()
    plan.run.build_node(node)
    return node.stage, time.perf_counter() - start


def _ray_init(workers: int, address: str | None):
    try:
        import ray
    except ImportError as err:
        raise NlsrError("--executor ray needs the ray package (pip install -r requirements.txt)") from err
    env = {k: v for k, v in os.environ.items() if k.startswith(("NLSR_", "HF_")) or k in ("PYTHONPATH",)}
    env.setdefault("NLSR_PROGRESS", "off")
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                 logging_level="ERROR", configure_logging=True)
    return ray


@EXECUTORS.register("ray")
def run_ray(plan: Plan, params_file: str, workers: int = 2, address: str | None = None,
            quiet: bool = False) -> list[tuple[str, float]]:
    """Build the pending nodes as Ray tasks, each after the tasks of its inputs (module docstring)."""
    pending = plan.pending()
    if not pending:
        return []
    ray = _ray_init(workers, address)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(build_in_worker)
        refs: dict[str, object] = {}
        names = {}
        for node in pending:
            deps = [refs[fp] for fp in node.upstream if fp in refs]
            resources = {"num_gpus": 1, "num_cpus": 0} if gpus and node.device == "gpu" else {"num_cpus": 1}
            ref = task.options(**resources, max_retries=0).remote(str(params_file), plan.numbers, node.fingerprint,
                                                                  *deps)
            refs[node.fingerprint] = ref
            names[ref] = node.stage
        built, waiting = [], list(refs.values())
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            stage, seconds = ray.get(done[0])
            built.append((stage, seconds))
            _say(f"{stage}: built in {seconds:.1f}s ({len(built)}/{len(pending)})", quiet)
        return built
    finally:
        ray.shutdown()


def execute(params_file: str | Path, numbers: Iterable[str] | None = None, executor: str = "local",
            workers: int = 2, address: str | None = None, quiet: bool = False) -> list[tuple[str, float]]:
    """Plan the notebooks ``numbers`` under ``params_file`` and build what is not cached with ``executor``."""
    params_file = str(Path(params_file).resolve()) if Path(params_file).is_file() else str(params_file)
    run = EXECUTORS[executor]
    plan = collect(load_params(params_file), numbers)
    _say(f"plan: {len(plan.nodes)} stages, {len(plan.pending())} to build ({executor}"
         f"{f', {workers} workers' if executor == 'ray' and not address else ''})", quiet)
    return run(plan, params_file, workers=workers, address=address, quiet=quiet)
