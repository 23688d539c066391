"""Per-module parallelism and progress for restoration (DESIGN.md §5, §7).

Restoration is thousands of small kernels (a few r×r products and one masked copy per module). With intra-op
threads each kernel ends in an OpenMP barrier, which costs a scheduler time slice (milliseconds) whenever the
CPU is shared — on a busy 2-core machine that made the similarity pass several times slower. So modules are
processed by a pool of ``torch.get_num_threads()`` Python threads (torch releases the GIL inside kernels), each
running single-threaded kernels; the previous thread setting is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..progress import bar

T = TypeVar("T")
R = TypeVar("R")


def progress(items, desc: str, enabled: bool | None = None, total: int | None = None):
    """A progress bar over ``items`` (nlsr_lib.progress decides whether it shows)."""
    return bar(items, desc, total=total, enabled=enabled is not False)


@contextmanager
def kernel_pool(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose workers run single-threaded torch kernels (intra-op threads set to 1 meanwhile)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers or threads) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def map_modules(fn: Callable[[T], R], items: Sequence[T], desc: str, show_progress: bool | None = None) -> list[R]:
    """``[fn(x) for x in items]`` (in order) on a :func:`kernel_pool`, with a progress bar."""
    with kernel_pool() as pool:
        return list(progress(pool.map(fn, items), desc, show_progress, total=len(items)))
