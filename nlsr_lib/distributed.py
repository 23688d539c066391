"""One training stage over several processes (``accelerate launch`` / ``torchrun``): ranks, barriers, placement.

Under a launcher every process runs the same ``nlsr`` command. The stage cache (:mod:`nlsr_lib.runs`) then

* builds a **local** stage (data, tokenizer, pretraining, judges, evaluations) on rank 0 alone while the other
  ranks wait for its manifest on disk (no collective call: ranks may reach a stage by different paths, e.g. a
  value one rank has memoised);
* builds a **distributed** stage (a trl training, which every rank reaches together) on every rank into one shared
  temporary directory between two barriers; the trainer synchronises the ranks, rank 0 alone writes the adapter,
  merges and finalises the artifact.

For the barriers to exist before the trainer starts, :func:`init` creates the process group as soon as a
multi-process run opens its run directory (``accelerate.PartialState``: gloo on CPUs, NCCL on GPUs). Each rank
places its model on its own device (:func:`device_map`), never ``device_map: auto`` (which splits one model
across the GPUs and is refused under DDP).
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_multiprocess() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Create the process group of a multi-process run (idempotent; nothing happens in a single process)."""
    if not is_multiprocess():
        return
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if not is_multiprocess():
        return
    import torch.distributed as dist

    init()
    dist.barrier()


def device_map(configured: str | None):
    """Where a rank loads its model: the configured map in one process; under a launcher the rank's own GPU
    (``{"": "cuda:LOCAL_RANK"}``), or the CPU (``None``) without GPUs or under DeepSpeed (which places the
    weights itself)."""
    if not is_multiprocess():
        return configured
    import torch

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or not torch.cuda.is_available():
        return None
    return {"": f"cuda:{local_rank()}"}
