"""Giving freed heap memory back to the kernel, periodically (glibc only).

A worker allocates and frees many buffers of changing sizes per request: receive
buffers for KV pages, the batch's activations as its shape changes, sampling tensors.
glibc's malloc keeps freed chunks in its arenas for reuse and returns memory to the
kernel only from the top of a heap (and from mmapped chunks above a threshold that
itself rises as larger blocks are freed), so a long-running worker's resident set
climbs to the high-water mark of that fragmentation and stays there, though Python
and torch hold none of it. ``malloc_trim(0)`` walks every arena and releases the free
pages inside them (``madvise(MADV_DONTNEED)``); nothing is moved or invalidated.

Measured: what loading the model leaves free is the most of it: in process
(``python -m bench.heap_growth --requests 120``, a prefill + decode pair in one process,
before the script trimmed at start-up) one trim after 120 requests returned 473 MiB,
306 MiB more than the load had added since start-up. An earlier reading credited the trim with
returning 179 of the 183 MiB a load had added; that script had run ``gc.collect()``
just before its trim, which freed a reference cycle's receive buffers first (see
below). So every worker process (``WorkerBase``) and the router
(``RouterService.start``) run one trim every ``interval_s`` on a daemon thread, off the
engine and the event loop (a trim takes ~10-50 ms; mallocs of other threads wait on the
arena lock meanwhile).

What it does not do: give back memory still in use. The decode worker's growth under
continuous load in the first soaks (+172 MiB in 10 minutes, trim on) was not free heap
but receive buffers held by a reference cycle until a full gc (fixed in
``cluster/kv_handoff.py``; the soak now shows it flat); a prefill worker's growth
under load is the oneDNN linear kernel's per-row-count state, in use too
(``bench/results/soak.md``, ``python -m bench.heap_growth --linear-rows 256``).

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
