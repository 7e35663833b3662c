"""One daemon thread that runs callbacks at deadlines (a heap, lazily cancelled).

The in-process transport and the fault injector need thousands of short deadlines; a
``threading.Timer`` each would be a thread each. Callbacks run on this thread: they must
be short (settle a future, pop a queue) and must not block.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class TimerHandle:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class TimerThread:
    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + delay_s, fn)
        with self._cond:
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def close(self) -> None:
        """Stop the thread; callbacks not yet due never run."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if not handle.cancelled:
                try:
                    handle.fn()
                except Exception:  # a bad callback must not stop every other deadline
                    log.exception("timer callback failed")
