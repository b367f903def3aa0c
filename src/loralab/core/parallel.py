"""Block ranges over Python threads: one fork/join per call for the blockwise 4-bit kernels.

Used by quantize (quant.py) and by both decoders (dequant.py, the native kernel's callback).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that created it, pool)


def over_block_ranges(n_blocks: int, work: Callable[[int, int], None], block_size: int = 64,
                      per_worker: int = 1 << 20) -> None:
    """Run ``work(first, last)`` over contiguous block ranges, one per torch thread, in Python threads.

    Small per-chunk ops run serially inside each range (torch releases the GIL in kernels), so there is
    one fork/join per call instead of one per op: on a loaded machine a per-op barrier waits for every
    descheduled worker, which made chunked intra-op parallelism 10-40x slower. A range gets at least
    ``per_worker`` elements: below that the fork/join costs more than it saves.
    """
    global _POOL
    workers = min(torch.get_num_threads(), max(1, n_blocks * block_size // per_worker))
    if workers <= 1:
        work(0, n_blocks)
        return
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < workers:  # new after fork
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loralab-quant"))
    edges = [n_blocks * i // workers for i in range(workers + 1)]
    futures = [_POOL[1].submit(work, a, b) for a, b in zip(edges[:-2], edges[1:-1])]
    work(edges[-2], edges[-1])  # the calling thread takes the last range: one hand-off fewer
    for future in futures:
        future.result()
