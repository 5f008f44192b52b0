"""Keep freed host memory in the process between training steps, as the CUDA caching
allocator keeps freed device memory.

On a CPU every tensor is a ``malloc``. glibc's defaults hand the freed top of its heap back
to the operating system as soon as more than a threshold is free, and serve allocations over
another threshold with a fresh ``mmap``; the next step's tensors of the same sizes then
fault every page in again and the kernel zeroes each one. Measured on this project's 2-core
CPU (``scripts/benchmark_step.py``, vocabulary 4,096, hidden 128): the module's SFT step
took about 4,000 page faults a step and its distillation step about 14,000, against a plain
loop's 900 and 11,000; with freed memory kept, both took none, and the module's SFT step
went from 1.18x the loop's time to 1.06x. Which step pays the most depends on where
unrelated objects lie on the heap. PyTorch's performance tuning guide recommends jemalloc
or TCMalloc on a CPU for the same reason: they reuse freed memory.

:func:`keep_freed_host_memory` sets two ``mallopt`` parameters, for the whole process (glibc
has no per-call form): never trim the heap, and serve allocations of up to 32 MiB (glibc's
own ceiling for the threshold) from it rather than from ``mmap``. Larger tensors (a 131k
vocabulary's chunk of logits) still come from ``mmap`` and fault in each time. The
process's resident memory stays at its peak, as a training process's device memory does.
Other C libraries (musl, macOS) are left as they are.

:func:`return_freed_host_memory` does the opposite, for a process that must stay small
(``module.keep_freed_host_memory=false``): a fixed mmap threshold of 128 KiB and trimming
above 128 KiB, so a freed tensor's pages go back to the system at once. glibc's default
raises its threshold to the largest block freed so far (up to 32 MiB), which keeps a step's
freed activations in the heap: measured on the SmolLM2 GRPO step
(``scripts/benchmark_lag.py``), the peak resident memory fell from 4.5 GB to 1.7 GB, all of
the difference freed memory that glibc held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit builds)
MMAP_THRESHOLD_MAX = 32 << 20
# allocations above this come from mmap and free at once; trimming above it (glibc's own default)
RETURN_THRESHOLD = 128 << 10
# "never": the largest value the int parameter holds
NEVER_TRIM = 2**31 - 1


@cache
def keep_freed_host_memory() -> bool:
    """Set glibc to keep freed heap memory for the rest of the process. Returns whether it
    did (False on another C library, or if glibc refused); a second call does nothing."""
    libc = _glibc()
    if libc is None:
        return False
    kept = bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)) and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
    if kept:
        log.info("host memory: freed heap memory is kept for the next step (glibc mallopt: no trimming, "
                 "allocations up to 32 MiB from the heap); module.keep_freed_host_memory=false turns this off")
    else:
        log.warning("host memory: glibc refused mallopt; freed memory goes back to the system as usual")
    return kept


@cache
def return_freed_host_memory() -> bool:
    """Set glibc to give freed memory back to the system at once (see the module's
    docstring). Returns whether it did; a second call does nothing."""
    libc = _glibc()
    if libc is None:
        return False
    returned = bool(libc.mallopt(M_MMAP_THRESHOLD, RETURN_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, RETURN_THRESHOLD))
    if returned:
        log.info("host memory: freed memory goes back to the system at once (glibc mallopt: mmap and trim "
                 "thresholds of 128 KiB); smaller and slower than module.keep_freed_host_memory=true")
    return returned


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only: musl and macOS have another allocator
    except (OSError, AttributeError, TypeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
