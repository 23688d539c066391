"""Executors: build every pending node of a plan (``nlsr run --executor local|ray``).

* ``local``: one process, the nodes in dependency order (what the notebooks would do, minus the tables).
* ``ray``: each node is a Ray task, submitted once its inputs are built, with a resource request of one GPU for a
  ``gpu`` stage where the cluster has GPUs and one CPU otherwise, so independent trainings and evaluations run
  side by side. On CPUs a stage that nothing else can usefully run beside (:func:`cpus_for`: the estimated work of
  every unfinished stage that is not downstream of it is smaller than its own, e.g. the tiny base model's
  pretraining) asks for every CPU and runs with that many torch threads. :func:`run_ray` starts a local Ray with
  ``workers`` CPUs (and the machine's GPUs) or joins the cluster at ``address``. A task receives the params file
  and a fingerprint, recomputes the plan in its worker (cheap: nothing is read) and builds that node through the
  same cache, so the artifacts are the local executor's, byte for byte where the computation is deterministic.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from ..config import load_params
from ..errors import NlsrError
from ..registry import Registry
from ..runs import Node
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


def build_in_worker(params_file: str, numbers: tuple[str, ...], fingerprint: str, threads: int = 0
                    ) -> tuple[str, float]:
    """A Ray task: build the node ``fingerprint`` of the plan of ``numbers`` under ``params_file`` (the plan is
    computed once per worker process), with ``threads`` torch threads when given."""
    key = (params_file, numbers, os.environ.get("NLSR_HOME"))
    if key not in _WORKER_PLANS:
        _WORKER_PLANS[key] = collect(load_params(params_file), numbers)
    plan = _WORKER_PLANS[key]
    node = plan.run.nodes.get(fingerprint)
    if node is None:
        raise NlsrError(f"stage fingerprint {fingerprint[:16]} is not in the plan of {params_file} in this worker "
                        "(params or code differ between the driver and the workers)")
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        plan.run.build_node(node)
    finally:
        torch.set_num_threads(before)
    return node.stage, time.perf_counter() - start


GENERATED_TOKEN_WEIGHT = 10  # a decoding step (sequential, overhead-bound) against a training token (batched)


def work(node: Node) -> float:
    """Estimated work of a node from its counts: training tokens plus weighted generated tokens (0 for light ones)."""
    counts = node.counts
    return (counts.get("training_tokens") or 0) + GENERATED_TOKEN_WEIGHT * (counts.get("generated_tokens") or 0)


def cpus_for(node: Node, unfinished: Iterable[Node], downstream: set[str], workers: int) -> int:
    """CPUs a ready ``node`` asks for: every one (``workers``) when the work of the ``unfinished`` nodes that could
    run beside it (not ``downstream`` of it) is smaller than its own, so a stage on a narrow waist of the graph gets
    the machine instead of one core of it; one otherwise."""
    beside = sum(work(n) for n in unfinished if n.fingerprint != node.fingerprint and n.fingerprint not in downstream)
    return workers if work(node) > 0 and beside < work(node) else 1


def downstream_of(nodes: list[Node]) -> dict[str, set[str]]:
    """For each node (dependency order), the fingerprints of the nodes that depend on it, directly or not."""
    below: dict[str, set[str]] = {n.fingerprint: set() for n in nodes}
    for node in reversed(nodes):
        for up in node.upstream:
            if up in below:
                below[up] |= {node.fingerprint} | below[node.fingerprint]
    return below


@EXECUTORS.register("ray")
def run_ray(plan: Plan, params_file: str, workers: int = 2, address: str | None = None,
            quiet: bool = False) -> list[tuple[str, float]]:
    """Build the pending nodes as Ray tasks, each submitted when its inputs are built (module docstring)."""
    pending = plan.pending()
    if not pending:
        return []
    ray = _ray_init(workers, address)
    try:
        cluster = ray.cluster_resources()
        gpus, cpus = cluster.get("GPU", 0) > 0, max(1, int(cluster.get("CPU", workers)))
        task = ray.remote(build_in_worker)
        by_fp = {n.fingerprint: n for n in pending}
        below = downstream_of(pending)
        waiting_on = {n.fingerprint: {u for u in n.upstream if u in by_fp} for n in pending}
        unfinished = dict(by_fp)
        running: dict[object, str] = {}
        built: list[tuple[str, float]] = []

        def submit_ready() -> None:
            for fp in [fp for fp, deps in waiting_on.items() if not deps]:
                del waiting_on[fp]
                node = by_fp[fp]
                if gpus and node.device == "gpu":  # the worker is reused (Ray's GPU default is one task per
                    # process), so the engine's bases and the judge stay loaded from one evaluation to the next
                    resources, threads = {"num_gpus": 1, "num_cpus": 0, "max_calls": 0}, 0
                else:
                    n_cpus = cpus_for(node, unfinished.values(), below[fp], cpus)
                    resources, threads = {"num_cpus": n_cpus}, n_cpus
                ref = task.options(**resources, max_retries=0).remote(str(params_file), plan.numbers, fp, threads)
                running[ref] = fp

        submit_ready()
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            fp = running.pop(done[0])
            stage, seconds = ray.get(done[0])
            del unfinished[fp]
            for deps in waiting_on.values():
                deps.discard(fp)
            built.append((stage, seconds))
            _say(f"{stage}: built in {seconds:.1f}s ({len(built)}/{len(pending)})", quiet)
            submit_ready()
        return built
    finally:
        ray.shutdown()


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


def execute(params_file: str | Path, numbers: Iterable[str] | None = None, executor: str = "local",
            workers: int = 2, address: str | None = None, quiet: bool = False) -> list[tuple[str, float]]:
    """Plan the notebooks ``numbers`` under ``params_file`` and build what is not cached with ``executor``."""
    params_file = str(Path(params_file).resolve()) if Path(params_file).is_file() else str(params_file)
    run = EXECUTORS[executor]
    plan = collect(load_params(params_file), numbers)
    _say(f"plan: {len(plan.nodes)} stages, {len(plan.pending())} to build ({executor}"
         f"{f', {workers} workers' if executor == 'ray' and not address else ''})", quiet)
    return run(plan, params_file, workers=workers, address=address, quiet=quiet)
