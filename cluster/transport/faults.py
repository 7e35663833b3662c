"""Fault injection for tests of failure semantics: wrap a transport, break chosen sends.

A send whose tag matches ``fail_tags`` (every send when it is None) is, in this order
of precedence:

- ``drop=True``: dropped silently. The send future resolves successfully, as if
  delivered, and nothing reaches the peer: its recv times out.
- ``delay_s > 0``: held back for ``delay_s`` seconds, then handed to the inner transport.
  The send future still honours its own ``timeout_s``: if the delay outlasts it, the
  future fails with ``timeout`` and the message is still delivered late (what a slow link
  does to a real transport too).
- otherwise: failed at once with ``TransferError("injected")``; nothing is sent.

Receives, the address, the name and the counters are the inner transport's, so a
``FaultyTransport`` stands in anywhere its inner one would (the KV protocol compares
``name`` with the peer's).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from cluster.transport.base import KVTransport, TransferError, check_tag, check_timeout, failed, new_future, settle
from cluster.transport.timer import TimerThread


class FaultyTransport(KVTransport):
    def __init__(
        self,
        inner: KVTransport,
        fail_tags: Callable[[int], bool] | None = None,
        delay_s: float = 0.0,
        drop: bool = False,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.inner = inner
        self.name = inner.name
        self.counters = inner.counters
        self.fail_tags = fail_tags
        self.delay_s = float(delay_s)
        self.drop = drop
        self.injected = 0  # sends this wrapper failed, dropped or delayed
        self._lock = threading.Lock()
        self._delayed: set[concurrent.futures.Future] = set()
        self._timers = TimerThread(name="kvrelay-faults") if self.delay_s > 0 else None
        self._closed = False

    @property
    def address(self) -> bytes:
        return self.inner.address

    def send(self, peer: bytes, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[None]:
        tag, timeout_s = check_tag(tag), check_timeout(timeout_s)
        if self.fail_tags is not None and not self.fail_tags(tag):
            return self.inner.send(peer, tag, buf, timeout_s)
        with self._lock:
            self.injected += 1
        if self.drop:
            fut = new_future()
            settle(fut, None)
            return fut
        if self.delay_s > 0:
            return self._send_late(peer, tag, buf, timeout_s)
        return failed("injected", f"send with tag {tag:#x} failed by fault injection")

    def recv(self, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[int]:
        return self.inner.recv(tag, buf, timeout_s)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            delayed, self._delayed = self._delayed, set()
        if self._timers is not None:
            self._timers.close()
        for fut in delayed:
            settle(fut, error=TransferError("closed", "transport closed while the send was delayed"))
        self.inner.close()

    def _send_late(self, peer: bytes, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[None]:
        fut = new_future()
        with self._lock:
            if self._closed:
                return failed("closed", "transport is closed")
            self._delayed.add(fut)

        def forward() -> None:
            inner = self.inner.send(peer, tag, buf, timeout_s)
            inner.add_done_callback(lambda f: self._finish(fut, f.exception()))

        def expire() -> None:
            error = TransferError("timeout", f"send with tag {tag:#x} delayed past its {timeout_s}s deadline")
            self._finish(fut, error)

        self._timers.call_later(self.delay_s, forward)
        self._timers.call_later(timeout_s, expire)
        return fut

    def _finish(self, fut: concurrent.futures.Future, error: BaseException | None) -> None:
        with self._lock:
            self._delayed.discard(fut)
        settle(fut, None, error)
