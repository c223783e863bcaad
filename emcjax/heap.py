"""The process heap for block-by-block runs (glibc only; a no-op elsewhere).

A streamed iteration allocates and frees the same block-sized arrays (tens of MB each) hundreds of times: the
host reads the next block in a worker thread while the devices work on the current one. With glibc's defaults
each thread allocates from its own heap arena, freed memory is returned to the system (large chunks are
``mmap``-ed and ``munmap``-ed, the top of a heap is trimmed), and every block then touches fresh pages: on the
200,000-frame streamed benchmark ~28,000 page faults per block and pass (14 M in the run), 28 % of the run's
CPU time in the kernel (docs/BENCHMARKS.md). Instead glibc is made to keep and reuse that memory: one arena for
all threads (:func:`single_arena`, set when emcjax is imported: a block the worker built is freed back where the
next one is allocated) and, once a run works block by block (:func:`steady_heap`), chunks below 1 GiB from the
heap rather than ``mmap`` and no trimming below 2 GiB of free heap. The process then holds its peak working set (about one more block than with trimming)
instead of returning it between blocks.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
from collections.abc import Callable, Iterator, Sequence

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
KEEP_FREE_BYTES = 2**31 - 1  # free heap kept before glibc trims it (the largest a C int holds)
MMAP_BYTES = 2**30  # allocations at least this large still get their own mapping


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        mallopt = getattr(ctypes.CDLL("libc.so.6"), "mallopt", None)
    except OSError:
        return False
    return mallopt is not None and all(mallopt(option, value) == 1 for option, value in settings)


@functools.cache
def single_arena() -> bool:
    """One glibc heap arena for all threads (``True`` if set). Effective only for threads that have not
    allocated yet, so emcjax sets it when it is imported, before JAX starts its threads (an arena, once a
    thread has one, stays its own)."""
    return _mallopt((_M_ARENA_MAX, 1))


@functools.cache
def steady_heap() -> bool:
    """Keeps freed memory for the next block (module docstring); ``True`` if set. Process-wide: it also
    applies to everything the process allocates afterwards."""
    return _mallopt((_M_MMAP_THRESHOLD, MMAP_BYTES), (_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))


def prefetched(build: Callable, blocks: Sequence) -> Iterator[tuple[object, object]]:
    """Yields ``(block, build(block))`` for every block, the next one built by a worker thread while the caller
    uses this one (with :func:`steady_heap`: the blocks freed here are reused for the next ones)."""
    steady_heap()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        pending = executor.submit(build, blocks[0])
        for b, block in enumerate(blocks):
            data = pending.result()
            if b + 1 < len(blocks):
                pending = executor.submit(build, blocks[b + 1])
            yield block, data
            del data
