"""host_memory.release_freed: freed small objects' pages go back to the OS (glibc)."""

import pytest

from finetune_jax import host_memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


@pytest.mark.skipif(host_memory._libc() is None, reason="no glibc malloc_trim here")
def test_freed_fragmented_heap_is_returned():
    # ~200 MB of 1 kB objects (above Python's own small-object allocator: glibc's heap), one
    # in 64 kept alive: the heap stays fragmented after the rest is freed, so glibc keeps
    # its pages until asked.
    objects = [bytes(1000) + i.to_bytes(4, "little") for i in range(200_000)]
    keep = objects[::64]
    del objects
    before = _rss_bytes()
    assert host_memory.release_freed()
    assert before - _rss_bytes() > 50e6
    assert len(keep) == 3_125
