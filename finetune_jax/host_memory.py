"""Give host memory that Python has freed back to the operating system.

Reading and tokenizing a dataset leaves hundreds of MB of freed small objects inside glibc's
heap, which keeps it (the process's RSS stays up) because live objects sit between the free
pages. `malloc_trim` returns those pages; the training loop calls it once the data is read,
before the weights and optimizer state arrive (0.2 GB per process of the 0.47B two-process
bench, tools/bench_big_load.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed() -> bool:
    """Collect garbage and return freed heap pages to the OS; False where the C library
    has no `malloc_trim` (not glibc: nothing to do)."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
