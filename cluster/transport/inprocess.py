"""Both sides in one process: unit tests, and colocated workers that share a process.

Addresses are random uuid4 bytes looked up in a process-local registry (an entry lives
from construction to ``close``), so two clusters in one process never collide.

A send copies straight into the matching posted recv buffer, or, if no recv is posted
yet, queues a private copy of the message until one is (the analogue of UCX's
unexpected-message queue). Either way the send resolves at once: like a UCX eager send it
completes whether or not the peer ever receives. A recv that times out is removed under
the lock, so no late message is ever written into its buffer.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.transport import buffers
from cluster.transport.base import KVTransport, TransferError, check_tag, check_timeout, failed, new_future, settle
from cluster.transport.timer import TimerHandle, TimerThread

_REGISTRY: dict[bytes, InProcessTransport] = {}
_REGISTRY_LOCK = threading.Lock()


@dataclass(eq=False)
class _PostedRecv:
    future: concurrent.futures.Future
    frame: buffers.Frame
    timer: TimerHandle | None = None


class InProcessTransport(KVTransport):
    name = "inprocess"

    def __init__(self) -> None:
        super().__init__()
        self._address = uuid.uuid4().bytes
        self._lock = threading.Lock()
        self._closed = False
        self._posted: dict[int, deque[_PostedRecv]] = {}
        self._unexpected: dict[int, deque[buffers.Frame]] = {}
        self._timers = TimerThread(name=f"kvrelay-inprocess-{self._address.hex()[:8]}")
        with _REGISTRY_LOCK:
            _REGISTRY[self._address] = self

    @property
    def address(self) -> bytes:
        return self._address

    def send(self, peer: bytes, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[None]:
        tag, _ = check_tag(tag), check_timeout(timeout_s)
        src = buffers.frame(buf, writable=False)
        if self._closed:
            return failed("closed", "transport is closed")
        with _REGISTRY_LOCK:
            target = _REGISTRY.get(bytes(peer))
        if target is None or not target._deliver(tag, src):
            return failed("peer", f"no in-process transport at address {bytes(peer).hex()}")
        self.counters.sent(buffers.nbytes(src))
        fut = new_future()
        settle(fut, None)
        return fut

    def recv(self, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[int]:
        tag, timeout_s = check_tag(tag), check_timeout(timeout_s)
        posted = _PostedRecv(new_future(), buffers.frame(buf, writable=True))
        with self._lock:
            if self._closed:
                return failed("closed", "transport is closed")
            queued = self._unexpected.get(tag)
            if queued:
                outcome = self._fill(posted, queued.popleft())
                if not queued:
                    del self._unexpected[tag]
            else:
                self._posted.setdefault(tag, deque()).append(posted)
                posted.timer = self._timers.call_later(timeout_s, lambda: self._expire(tag, posted, timeout_s))
                outcome = None
        if outcome is not None:  # settle outside the lock: callbacks may call back in
            settle(posted.future, *outcome)
        return posted.future

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [p for queue in self._posted.values() for p in queue]
            self._posted.clear()
            self._unexpected.clear()
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self._address, None)
        self._timers.close()
        for p in pending:
            settle(p.future, error=TransferError("closed", "transport closed while the recv was pending"))

    # ---- receiving side ---------------------------------------------------------------

    def _deliver(self, tag: int, src: buffers.Frame) -> bool:
        """Called by the sending transport. False if this transport is closed."""
        with self._lock:
            if self._closed:
                return False
            queue = self._posted.get(tag)
            if not queue:
                self._unexpected.setdefault(tag, deque()).append(buffers.owned_copy(src))
                return True
            posted = queue.popleft()
            if not queue:
                del self._posted[tag]
            posted.timer.cancel()
            outcome = self._fill(posted, src)
        settle(posted.future, *outcome)
        return True

    def _fill(self, posted: _PostedRecv, src: buffers.Frame) -> tuple[int | None, TransferError | None]:
        """Copy a message into a recv buffer (lock held); returns settle()'s arguments."""
        n, room = buffers.nbytes(src), buffers.nbytes(posted.frame)
        if n > room:  # the message is consumed either way, as with UCX truncation
            return None, TransferError("size", f"message of {n} bytes does not fit the {room}-byte receive buffer")
        buffers.copy_into(posted.frame, src)
        self.counters.received(n)
        return n, None

    def _expire(self, tag: int, posted: _PostedRecv, timeout_s: float) -> None:
        with self._lock:
            queue = self._posted.get(tag)
            if queue is None or posted not in queue:
                return  # matched or closed meanwhile
            queue.remove(posted)
            if not queue:
                del self._posted[tag]
        settle(posted.future, error=TransferError("timeout", f"no message with tag {tag:#x} within {timeout_s}s"))
