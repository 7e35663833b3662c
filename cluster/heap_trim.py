"""Giving freed heap memory back to the kernel, periodically (glibc only).

A worker allocates and frees many buffers of changing sizes per request: receive
buffers for KV pages, the batch's activations as its shape changes, sampling tensors.
glibc's malloc keeps freed chunks in its arenas for reuse and returns memory to the
kernel only from the top of a heap (and from mmapped chunks above a threshold that
itself rises as larger blocks are freed), so a long-running worker's resident set
climbs to the high-water mark of that fragmentation and stays there, though Python
and torch hold none of it. ``malloc_trim(0)`` walks every arena and releases the free
pages inside them (``madvise(MADV_DONTNEED)``); nothing is moved or invalidated.

Measured (``python -m bench.heap_growth``: an in-process prefill + decode pair, 160
chat requests, 4 at a time): the process grew by 183 MiB, and one ``malloc_trim(0)``
once the load was over gave 179 MiB back (an earlier version of that script, trimming
off); Python's gc saw no growing object type; ``MALLOC_ARENA_MAX=2`` changed nothing
(168 grown, 178 returned). So every worker process (``WorkerBase``) and the router
(``RouterService.start``) run one trim every ``interval_s`` on a daemon thread, off the
engine and the event loop (a trim takes ~10-15 ms; mallocs of other threads wait on the
arena lock meanwhile).

What it does not do: bound the growth *during* a continuous load. With the trim every
30 s the same run still grew by 134 MiB under load, and 144 MiB came back only once it
was idle (``--heap-trim-s 30``); the 10-minute soak shows the same (decode worker +172
MiB under load, +4 MiB after): while requests run, most of it is either still in use
or not free in whole pages (which of the two is not measured). A fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``: large buffers mmapped
and unmapped on free, never parked in an arena) halved it in one run (+87 MiB under load,
65 returned once idle) but is not the default: it is one run, and it changes how every
large tensor of the engine is allocated.

One trimmer per process (in-process tests build several workers in one process).
Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _malloc_trim():
    """libc's malloc_trim, or None where there is none (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_now() -> bool:
    """Release free heap pages now; False where malloc_trim does not exist."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def start(interval_s: float) -> bool:
    """Trim every ``interval_s`` seconds for the life of this process (0: never).
    Idempotent: the first call's interval wins. False when nothing was started."""
    global _thread
    if interval_s <= 0:
        return False
    fn = _malloc_trim()
    if fn is None:
        log.info("no malloc_trim in this libc: the heap is not trimmed")
        return False
    with _lock:
        if _thread is not None:
            return True

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                t0 = time.perf_counter()
                fn(0)
                log.debug("malloc_trim took %.1f ms", (time.perf_counter() - t0) * 1e3)

        _thread = threading.Thread(target=loop, name="kvrelay-heap-trim", daemon=True)
        _thread.start()
    return True
