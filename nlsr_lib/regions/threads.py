"""One CPU thread for the many small tensor operations after a statistics pass.

Eigendecompositions of r × r matrices, thin QRs of d_out × r matrices, ``abs`` and ``kthvalue`` over a LoRA
matrix are each too small to gain from several threads; on a shared machine each multi-threaded call instead
pays a thread wake-up that can cost milliseconds (measured with ``benchmarks/regions.py``: the post-processing
of a 290M-parameter model went from ~10 s to ~1 s). :class:`single_thread` sets ``torch`` to one intra-op thread
inside the block and restores the previous count afterwards; it changes nothing on the GPU.
"""

from __future__ import annotations

import torch


class single_thread:  # noqa: N801 - used like a function: ``with single_thread():``
    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
