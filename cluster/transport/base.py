"""The transport contract: move one tagged contiguous buffer from this process to a peer.

A message is (tag, bytes). ``send(peer, tag, buf)`` on one side is received by
``recv(tag, buf)`` posted on the peer with exactly the same 64-bit tag, whichever of the
two happens first. There is no other matching, ordering or framing: the KV protocol
(headers, layer order, acks) is built on top of this by ``cluster.kv_handoff``.

Rules every implementation follows:

* ``send`` and ``recv`` may be called from any thread and never block; they return a
  ``concurrent.futures.Future`` (wrap it with ``asyncio.wrap_future`` in async code).
  The futures cannot be cancelled (deadlines are the way to give up). Their done-callbacks
  run on a transport thread: keep them short and never block in them.
* Every operation has a deadline (``timeout_s`` seconds from the call). Failures are a
  ``TransferError`` whose ``reason`` says what happened; programming errors (a bad tag,
  a non-contiguous or read-only receive buffer) raise at the call instead.
* A tag is single-use per receiver: at most one message in flight per (receiver, tag),
  and a tag whose recv timed out is not reused.
* Buffers are lent, not copied: the caller keeps ``buf`` unchanged (send) and unread
  (recv) until the future is done. After a *timeout* the transport may still hold the
  buffer until the transfer underneath finishes or the transport closes; see the
  implementation's notes (``UcxTransport``) for what that means for reuse.
"""

from __future__ import annotations

import concurrent.futures
import math
import operator
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

REASONS = ("timeout", "closed", "peer", "injected", "size")
MAX_TAG = 2**64 - 1


class TransferError(RuntimeError):
    """A transfer failed. ``reason`` is one of:

    - ``timeout``: the deadline passed first;
    - ``closed``: this transport was closed while the transfer was pending;
    - ``peer``: the peer is unknown, unreachable or broke the link, or sent something
      that is not a message of this transport;
    - ``injected``: ``FaultyTransport`` failed it on purpose;
    - ``size``: the incoming message is larger than the receive buffer.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown TransferError reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep (reason, message) when pickled through Ray
        return (type(self), (self.reason, self.message))


@dataclass
class TransferCounters:
    """Completed transfers only; bytes are payload bytes (no transport framing)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.messages_sent += 1

    def received(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_received += nbytes
            self.messages_received += 1


class KVTransport(ABC):
    """Moves tagged contiguous buffers between processes (see the module docstring)."""

    name: str  # "ucx" | "inprocess"

    def __init__(self) -> None:
        self.counters = TransferCounters()

    @property
    @abstractmethod
    def address(self) -> bytes:
        """Opaque, picklable; a peer passes it to ``send`` to reach this transport."""

    @abstractmethod
    def send(self, peer: bytes, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[None]:
        """Send the bytes of ``buf`` (contiguous torch tensor, numpy array, bytes,
        bytearray or memoryview) to the transport at ``peer`` under ``tag``. Resolves
        when the transport no longer needs ``buf``."""

    @abstractmethod
    def recv(self, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[int]:
        """Receive the message sent with ``tag`` into ``buf`` (a preallocated, writable,
        contiguous torch tensor or numpy array). Resolves with the message's size in
        bytes; a message larger than ``buf`` fails with reason ``size``."""

    @abstractmethod
    def close(self) -> None:
        """Fail pending futures with reason ``closed`` and release resources. Idempotent."""

    @property
    def bytes_sent(self) -> int:
        return self.counters.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.counters.bytes_received

    @property
    def messages_sent(self) -> int:
        return self.counters.messages_sent

    @property
    def messages_received(self) -> int:
        return self.counters.messages_received


# ---- helpers shared by the implementations ---------------------------------------------


def check_tag(tag: int) -> int:
    tag = operator.index(tag)
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must be an unsigned 64-bit integer, got {tag}")
    return tag


def check_timeout(timeout_s: float) -> float:
    timeout_s = float(timeout_s)
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s}")
    return timeout_s


def new_future() -> concurrent.futures.Future:
    """A future already marked running, so ``cancel()`` is refused (deadlines decide)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()
    return fut


def settle(fut: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> bool:
    """Resolve ``fut`` unless someone (timeout, close) already did; True if this call did."""
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def failed(reason: str, message: str) -> concurrent.futures.Future:
    fut = new_future()
    fut.set_exception(TransferError(reason, message))
    return fut
