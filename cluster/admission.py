"""Admission: requests wait here, per pool, until a decode worker can reserve their KV.

A request whose decode reservation is refused everywhere (``CapacityError``), or that
finds no worker of a pool up while Ray restarts one, does not fail: it queues, FIFO, retries and migrations ahead of fresh requests, and only the
head of the queue tries again (when a request on the pool ends, else every
``POLL_S``). The prefill never starts before the reservation is granted, so a waiting
request holds no KV anywhere.

    fresh ──► queue empty? ── try ── granted ──────────────► run
                  │ no          │ CapacityError
                  ▼             ▼
           [retries | fresh]  full? ── AdmissionRejected("full")   (503 + Retry-After)
             head tries on wake / poll; past the deadline ── AdmissionRejected("timeout")
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cluster.worker_api import CapacityError

T = TypeVar("T")
POLL_S = 0.25  # the head retries at least this often (capacity freed elsewhere, restarts)


class PoolUnavailable(CapacityError):
    """No worker of ``pool`` can take the request now, but one may come back (Ray is
    restarting it): the request waits in the queue, and its wait is counted against
    ``pool``, not the queue's own."""

    def __init__(self, message: str, pool: str) -> None:
        super().__init__(message)
        self.pool = pool


class AdmissionRejected(RuntimeError):
    """Not admitted: the queue is full (``reason="full"``) or the wait passed its
    deadline (``"timeout"``). The API answers 503 with ``Retry-After``."""

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class AdmissionQueue:
    def __init__(self, pool: str, max_waiting: int, timeout_s: float, retry_after_s: float,
                 on_wait: Callable[[str, float], None] | None = None) -> None:
        self.pool = pool
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        # (pool, seconds waited) of every request that queued; the pool is the one it last
        # waited on (a PoolUnavailable's, else this queue's).
        self.on_wait = on_wait
        self.rejected: collections.Counter[str] = collections.Counter()  # reason -> count
        self.queued_total = 0
        self._retries: collections.deque[object] = collections.deque()
        self._fresh: collections.deque[object] = collections.deque()
        self._changed = asyncio.Event()

    @property
    def depth(self) -> int:
        return len(self._retries) + len(self._fresh)

    def wake(self) -> None:
        """Capacity may have freed (a request ended, a worker came up): the head tries."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _head(self) -> object | None:
        return self._retries[0] if self._retries else (self._fresh[0] if self._fresh else None)

    async def admit(self, attempt: Callable[[], Awaitable[T]], *, retry: bool = False) -> T:
        """``attempt()`` reserves, or raises CapacityError when no worker has room.
        Returns its result; raises AdmissionRejected, or whatever else attempt raises."""
        why = "no free KV"  # the last CapacityError's words, for the refusal
        waited_on = self.pool  # the pool of the last CapacityError, for on_wait
        if self.depth == 0:  # nobody ahead: try at once
            try:
                return await attempt()
            except CapacityError as e:
                why, waited_on = str(e) or why, getattr(e, "pool", self.pool)
        if self.depth >= self.max_waiting:
            self.rejected["full"] += 1
            raise AdmissionRejected(f"the {self.pool} pool's admission queue is full ({self.depth} waiting; {why})",
                                    "full", self.retry_after_s)
        ticket = object()
        (self._retries if retry else self._fresh).append(ticket)
        self.queued_total += 1
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        try:
            while True:
                if self._head() is ticket:
                    try:
                        return await attempt()
                    except CapacityError as e:
                        why, waited_on = str(e) or why, getattr(e, "pool", self.pool)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.rejected["timeout"] += 1
                    raise AdmissionRejected(f"the request waited {self.timeout_s:g}s in the {self.pool} pool's "
                                            f"admission queue ({why})", "timeout", self.retry_after_s)
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), min(POLL_S, remaining))
                except asyncio.TimeoutError:
                    pass
        finally:
            (self._retries if retry else self._fresh).remove(ticket)
            if self.on_wait is not None:
                self.on_wait(waited_on, time.monotonic() - t0)
            self.wake()  # the next head may fit too
