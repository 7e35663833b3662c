"""UCX transport (ucxx): tag messages between processes over shared memory, TCP, RDMA,
cuda_ipc and cuda_copy, whichever UCX finds.

How it is built, and why:

* **One UCX context + worker per transport**, created directly as a ucxx
  ``ApplicationContext`` rather than through ucxx's module-level singleton, so several
  transports (tests, two clusters) can live in one process without sharing a tag space,
  and no ``ucxx.init``/``ucxx.reset`` is needed between uses. The address is the worker
  address (about 200 bytes): no listener, no port, nothing global.
* **One asyncio event loop on a daemon thread** owns every ucxx call. ``send``/``recv``
  only convert the buffer to a byte view on the caller's thread and hand the rest to the
  loop with ``call_soon_threadsafe``, so a model-forward hook can call ``send`` without
  blocking.
* **Progress**: ucxx's "thread" mode, a C++ progress thread that sleeps in epoll (1 ms
  timeout) and submits requests ("delayed submission"), with **Python futures** enabled:
  ucxx's notifier thread resolves an asyncio future per request. Without them
  ``Request.wait()`` spins on ``asyncio.sleep(0)``, a whole core per pending transfer.
* **Framing**: ucxx does not report how many bytes a tag receive got (it drops UCX's
  ``ucp_tag_recv_info.length``). So each message is two UCX tag messages under the same
  tag: a 16-byte header (magic, version, payload size), then the payload, which UCX
  writes straight into the receive buffer. UCX matches messages from one endpoint in the
  order they were sent, and the receiver posts its two receives in order, so the pair
  cannot cross. This is also how ucxx's own ``send_obj`` learns sizes.
* **Buffers**: host memory goes to UCX as a numpy uint8 view, CUDA memory as a torch
  uint8 tensor via ``__cuda_array_interface__`` (never staged through host). Before a
  CUDA send or recv the loop waits (polling, not blocking the caller) for an event
  recorded on the caller's current stream at the call, so UCX never reads KV the kernels
  have not finished writing, nor writes memory earlier kernels still use.
* **Endpoints** are created from the peer's worker address on first send and cached;
  one that fails is dropped, so the next send reconnects. They are created without UCX's
  peer-failure mode by default (see ``error_handling``), which is what lets UCX use
  shared memory and CMA zero-copy between processes on one host.
* UCX warns about environment variables it does not know, including UCX_MEMTYPE_CACHE,
  which ucxx itself sets; ``UCX_WARN_UNUSED_ENV_VARS=n`` is set (unless already set)
  before ucxx is first imported.

**Deadlines and buffer lifetime** (what the protocol author must know):

* A timed-out *recv* is cancelled (ucxx cancels a request when its last reference is
  dropped; there is no other cancel in its Python API). A receive that has not matched a
  message yet is cancelled within milliseconds, and its buffer released. One already
  matched (a large rendezvous transfer in progress) cannot be cancelled by UCX: it
  completes into the buffer later. The transport keeps the buffer referenced until then
  or until ``close()`` (``lingering`` counts such transfers); the caller must not hand
  that memory to someone else while ``lingering`` says it may still be written, or must
  close the transport first. After any failed recv the buffer's contents are undefined.
* A timed-out *send* cannot be cancelled either: UCX may still read the buffer until the
  peer receives it, the peer closes, or this transport closes. The buffer is kept alive
  meanwhile; do not modify it.
* A message nobody receives stays in the receiver's unexpected queue (small messages)
  or holds the sender's request (large ones) until one side closes.
* A peer that died or closed: with ``error_handling=True`` sends to it fail with ``peer``
  at once. By default they time out (a large send), fail with ``peer`` (a shared-memory
  error), or even succeed (a small eager send that lands nowhere): only an ack from the
  peer proves delivery. Receives from a dead peer time out.
* Order: messages under different tags are independent. Two messages under one tag from
  one sender are received in order, but a tag must carry one message at a time: the
  header/payload pairs of two senders using the same tag could interleave.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import gc
import logging
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.transport import buffers
from cluster.transport.base import KVTransport, TransferError, check_tag, check_timeout, failed, new_future, settle

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<4sHHQ")  # magic, version, reserved, payload bytes: 16 bytes
_MAGIC, _VERSION = b"KVRT", 1
_CLOSE_TIMEOUT_S = 10.0

# Transports not closed by their owner are closed at interpreter exit: a UCX worker
# destroyed during interpreter teardown can hang the process.
_LIVE: weakref.WeakSet[UcxTransport] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for transport in list(_LIVE):
        transport.close()


def _import_ucxx():
    """Import ucxx only when a UcxTransport is built (``import cluster.transport`` must not
    need it). UCX warns about env vars it does not know, including the UCX_MEMTYPE_CACHE
    that ucxx itself sets; silence that unless the deployment asked for it."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx
        import ucxx._lib.libucxx as ucx_api
        from ucxx._lib.arr import Array
        from ucxx._lib_async import ApplicationContext
        from ucxx._lib_async import application_context as app_ctx_module
        from ucxx.types import Tag
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the ucx transport needs ucxx: pip install ucxx-cu12 (or ucxx-cu13)") from e
    return ucxx, ucx_api, Array, ApplicationContext, app_ctx_module, Tag


class _Deadline:
    """``timeout_s`` from the call to send/recv (time spent queued for the loop counts)."""

    __slots__ = ("at", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.at = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


@dataclass(eq=False)
class _Op:
    """One send or recv in flight. ``keep`` pins the memory UCX may touch."""

    future: concurrent.futures.Future
    tag: int
    keep: list = field(default_factory=list)
    requests: list | None = None  # ucxx UCXRequest; dropping them cancels unfinished ones
    waits: list = field(default_factory=list)  # the requests' asyncio futures


class UcxTransport(KVTransport):
    """``error_handling``: create endpoints in UCX's peer-failure mode. A broken peer is
    then reported at once (reason ``peer``), but UCX may only use transports that can
    detect peer failure, which excludes shared memory (sysv/posix) and CMA zero-copy on one
    host: everything falls back to TCP loopback, about 5x slower here (see
    bench/results/transfer.md). Off by default: KV transfers have deadlines and acks, so
    a dead peer still surfaces, as a timeout (an eager send to it may even succeed)."""

    name = "ucx"

    def __init__(self, *, error_handling: bool = False) -> None:
        super().__init__()
        self.error_handling = error_handling
        (self._ucxx, self._api, self._Array, ApplicationContext, self._app_ctx_module, self._Tag) = _import_ucxx()
        self._lock = threading.Lock()
        self._closed = False
        self._ops: set[_Op] = set()  # pending: close() fails them
        self._lingering: dict[_Op, asyncio.Task] = {}  # past deadline, still owning buffers
        self._endpoints: dict[bytes, Any] = {}  # peer address -> UCXEndpoint (loop thread only)
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvrelay-ucx", daemon=True)
        self._thread.start()

        try:
            opening = asyncio.run_coroutine_threadsafe(self._open(ApplicationContext), self._loop)
            self._ctx, self._progress = opening.result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._address = bytes(self._ctx.worker_address)
        _LIVE.add(self)

    async def _open(self, ApplicationContext):
        """Built on the loop thread: ucxx binds its notifier thread and progress to the
        running loop. Returns the context and its progress task, which we hold ourselves:
        ucxx's ProgressTasks registry is process-global and is cleared whenever *any*
        ApplicationContext is collected, which would stop this one's progress thread."""
        ctx = ApplicationContext(progress_mode="thread", enable_python_future=True)
        if not ctx.worker.enable_python_future:
            raise RuntimeError("this ucxx build lacks Python future notification (UCXX_ENABLE_PYTHON)")
        return ctx, self._app_ctx_module.ProgressTasks[self._loop]

    @property
    def address(self) -> bytes:
        return self._address

    @property
    def lingering(self) -> int:
        """Transfers past their deadline whose buffers UCX may still read or write."""
        return len(self._lingering)

    # ---- the interface (any thread) ----------------------------------------------------

    def send(self, peer: bytes, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[None]:
        tag, timeout_s = check_tag(tag), check_timeout(timeout_s)
        payload = buffers.frame(buf, writable=False)
        ready = buffers.ready_event(payload)  # CUDA: the caller's stream must finish first
        op = _Op(new_future(), tag, keep=[buf, payload])
        return self._start(op, self._send(op, bytes(peer), payload, ready, _Deadline(timeout_s)))

    def recv(self, tag: int, buf: Any, timeout_s: float) -> concurrent.futures.Future[int]:
        tag, timeout_s = check_tag(tag), check_timeout(timeout_s)
        into = buffers.frame(buf, writable=True)
        ready = buffers.ready_event(into)  # CUDA: earlier kernels on this memory finish first
        op = _Op(new_future(), tag, keep=[buf, into])
        return self._start(op, self._recv(op, into, ready, _Deadline(timeout_s)))

    def close(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("UcxTransport.close() cannot run on the transport's own thread (a future callback)")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._ops = self._ops, set()
        for op in pending:
            settle(op.future, error=TransferError("closed", "transport closed while the transfer was pending"))
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(pending), self._loop).result(_CLOSE_TIMEOUT_S)
        except Exception:
            log.exception("UCX transport shutdown did not finish cleanly")
        ctx, self._ctx, self._progress = self._ctx, None, None
        # Off the loop thread: the notifier hands results to the loop while it stops. The
        # first stop wakes it at once (else it sleeps up to 1 s); waking resets ucxx's state
        # to "running", so stop again or the worker's destructor warns.
        ctx.worker.stop_request_notifier_thread()
        ctx.stop_notifier_thread()
        ctx.worker.stop_request_notifier_thread()
        ctx.worker.stop_progress_thread()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CLOSE_TIMEOUT_S)
        self._app_ctx_module.ProgressTasks.pop(self._loop, None)
        if not self._thread.is_alive():
            self._loop.close()
            vars(self._loop).pop("close", None)  # ucxx's patched close() holds the worker
        # Destroy the worker now, not at interpreter exit (where UCX teardown can hang).
        # Nothing progresses it any more, so no lingering buffer can be touched after this.
        self._lingering.clear()
        del ctx
        gc.collect()

    # ---- on the loop thread -----------------------------------------------------------

    def _start(self, op: _Op, coro) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                coro.close()
                return failed("closed", "transport is closed")
            self._ops.add(op)
            self._loop.call_soon_threadsafe(self._spawn, op, coro)
        return op.future

    def _spawn(self, op: _Op, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(op, t))

    def _task_done(self, op: _Op, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:  # a bug here, not a transfer failure: say so, and fail the op
            log.error("UCX transfer task failed", exc_info=error)
            self._finish(op, error=TransferError("peer", f"internal error: {error!r}"))

    def _finish(self, op: _Op, result: Any = None, error: TransferError | None = None) -> None:
        with self._lock:
            self._ops.discard(op)
        settle(op.future, result, error)

    async def _send(self, op: _Op, peer: bytes, payload: buffers.Frame, ready, deadline: _Deadline) -> None:
        if ready is not None and not await self._until(ready.query, deadline):
            return self._finish(op, error=TransferError("timeout", "CUDA stream did not finish writing the buffer"))
        nbytes = buffers.nbytes(payload)
        header = np.frombuffer(_HEADER.pack(_MAGIC, _VERSION, 0, nbytes), dtype=np.uint8)
        op.keep.append(header)
        try:
            ep = self._endpoint(peer)
            self._refill_futures()
            tag = self._Tag(op.tag)
            op.requests = [ep.tag_send(self._Array(header), tag), ep.tag_send(self._Array(payload), tag)]
        except Exception as e:  # bad address, or an endpoint that broke
            self._endpoints.pop(peer, None)
            return self._finish(op, error=TransferError("peer", f"cannot send to peer: {e!r}"))
        op.waits = [_quiet(r.future) for r in op.requests]
        if not await self._wait(op.waits, deadline):
            self._linger(op, cancel=False)
            return self._finish(op, error=TransferError(
                "timeout", f"send with tag {op.tag:#x} not taken within {deadline.timeout_s}s"))
        error = _first_error(op.waits)
        if error is not None:
            self._endpoints.pop(peer, None)
            return self._finish(op, error=TransferError("peer", f"send failed: {error!r}"))
        self.counters.sent(nbytes)
        self._finish(op)

    async def _recv(self, op: _Op, into: buffers.Frame, ready, deadline: _Deadline) -> None:
        if ready is not None and not await self._until(ready.query, deadline):
            return self._finish(op, error=TransferError("timeout", "CUDA stream did not release the buffer"))
        header = np.zeros(_HEADER.size, dtype=np.uint8)
        op.keep.append(header)
        tag = self._Tag(op.tag)
        worker = self._ctx.worker
        self._refill_futures()
        op.requests = [worker.tag_recv(self._Array(header), tag), worker.tag_recv(self._Array(into), tag)]
        op.waits = [_quiet(r.future) for r in op.requests]
        if not await self._wait(op.waits[:1], deadline):
            return self._expire(op, deadline.timeout_s)
        try:
            nbytes = self._parse_header(op.waits[0], header)
        except TransferError as e:
            self._linger(op, cancel=True)
            return self._finish(op, error=e)
        if nbytes > buffers.nbytes(into):
            self._linger(op, cancel=False)  # UCX consumes the oversized payload (truncated)
            return self._finish(op, error=TransferError(
                "size", f"message of {nbytes} bytes does not fit the {buffers.nbytes(into)}-byte receive buffer"))
        if not await self._wait(op.waits[1:], deadline):
            return self._expire(op, deadline.timeout_s)
        error = _first_error(op.waits[1:])
        if error is not None:
            return self._finish(op, error=TransferError("peer", f"receive failed: {error!r}"))
        self.counters.received(nbytes)
        self._finish(op, nbytes)

    def _parse_header(self, wait: asyncio.Future, header: np.ndarray) -> int:
        error = _first_error([wait])
        if isinstance(error, self._api.UCXMessageTruncatedError):
            raise TransferError("peer", "got a message that is not a kvrelay transport header (reused tag?)")
        if error is not None:
            raise TransferError("peer", f"receive failed: {error!r}")
        magic, version, _, nbytes = _HEADER.unpack(header.tobytes())
        if magic != _MAGIC or version != _VERSION:
            raise TransferError("peer", f"bad transport header {header.tobytes()!r} (want {_MAGIC!r} v{_VERSION})")
        return nbytes

    def _expire(self, op: _Op, timeout_s: float) -> None:
        self._linger(op, cancel=True)
        self._finish(op, error=TransferError("timeout", f"no message with tag {op.tag:#x} within {timeout_s}s"))

    def _linger(self, op: _Op, cancel: bool) -> None:
        """Keep ``op``'s buffers until its requests finish. ``cancel``: drop our references
        to the requests, which makes ucxx cancel those not yet matched (they then finish at
        once with UCXCanceledError)."""
        if cancel:
            op.requests = None
        pending = [w for w in op.waits if not w.done()]
        if not pending:
            return

        async def release():
            await asyncio.wait(pending)
            self._lingering.pop(op, None)

        self._lingering[op] = self._loop.create_task(release())

    def _refill_futures(self) -> None:
        """Each request takes a Python future from ucxx's pool (100, refilled by the
        notifier thread); a burst of transfers empties it and ucxx warns. Topping it up
        here costs a mutex and a size check when it is at least half full."""
        self._ctx.worker.populate_python_futures_pool()

    def _endpoint(self, peer: bytes):
        ep = self._endpoints.get(peer)
        if ep is not None and not ep.alive:
            self._endpoints.pop(peer)
            ep = None
        if ep is None:
            address = self._ucxx.get_ucx_address_from_buffer(peer)
            ep = self._api.UCXEndpoint.create_from_worker_address(self._ctx.worker, address, self.error_handling)
            self._endpoints[peer] = ep
        return ep

    async def _wait(self, waits: list, deadline: _Deadline) -> bool:
        """True when every future is done by ``deadline``; never cancels them."""
        pending = [w for w in waits if not w.done()]
        if pending:
            _, pending = await asyncio.wait(pending, timeout=deadline.remaining())
        return not pending

    async def _until(self, ready, deadline: _Deadline) -> bool:
        while not ready():
            if deadline.remaining() == 0:
                return False
            await asyncio.sleep(50e-6)
        return True

    async def _shutdown(self, pending: set[_Op]) -> None:
        """With the progress thread still running: cancel what can be cancelled, close
        endpoints (which aborts their unfinished sends), and give both a moment to finish,
        so the worker is not destroyed under requests still in flight."""
        for task in list(self._tasks) + list(self._lingering.values()):
            task.cancel()
        ops = list(pending) + list(self._lingering)
        for op in ops:
            op.requests = None  # cancels receives that have not matched a message
        for ep in self._endpoints.values():
            # Bounded: 0.1 s per attempt, even when the peer is gone (ucxx's async close
            # request never completes for a dead peer).
            ep.close_blocking(period=100_000_000, max_attempts=1)
        self._endpoints.clear()
        unfinished = [w for op in ops for w in op.waits if not w.done()]
        if unfinished:
            await asyncio.wait(unfinished, timeout=0.5)
        await asyncio.sleep(0)  # let cancelled tasks unwind


def _quiet(fut: asyncio.Future) -> asyncio.Future:
    """Mark a ucxx request future's exception as seen (we read it, or do not need it), so
    asyncio does not log "exception was never retrieved" for cancelled requests."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def _first_error(waits: list) -> BaseException | None:
    for w in waits:
        if w.cancelled():
            return asyncio.CancelledError()
        if w.exception() is not None:
            return w.exception()
    return None
