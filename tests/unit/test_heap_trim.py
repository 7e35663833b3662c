"""cluster/heap_trim.py: free heap that glibc keeps below a live chunk goes back to the
kernel on a trim (the reason a long-running worker's RSS climbed in the soak), and the
cluster configures every worker's trimmer."""

from __future__ import annotations

import ctypes
import os
import platform

import pytest

from cluster import heap_trim

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@glibc
def test_a_trim_returns_free_heap_pinned_below_a_live_chunk():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 << 10, 1600  # 100 MiB in chunks below the mmap threshold: heap, not mmap
    chunks = []
    for _ in range(n):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)  # touch: resident
        chunks.append(p)
    for p in chunks[:-1]:  # the last one pins the top of the heap: free() cannot shrink it
        libc.free(p)
    held = _rss_mib()
    assert heap_trim.trim_now()
    released = held - _rss_mib()
    libc.free(chunks[-1])
    assert released > 50, f"only {released:.1f} MiB released"


def test_interval_zero_starts_nothing():
    assert heap_trim.start(0) is False


def test_every_worker_gets_the_configured_interval():
    from cluster.cluster import KVRelayCluster
    from cluster.config import ClusterConfig

    c = KVRelayCluster(ClusterConfig.build({"pools": {"heap_trim_s": 12.5}}), use_ray=False)
    assert {s.heap_trim_s for p in c.pools for s in p.specs} == {12.5}
    assert ClusterConfig.build({}).pools.heap_trim_s == 30.0
