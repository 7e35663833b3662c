"""An asyncio front for an Engine, usable from a Ray actor or any event loop.

The engine runs on one dedicated thread (torch releases the GIL in its kernels, so
the event loop stays responsive); callers talk to it through a command queue and get
their outputs streamed back through per-request asyncio queues::

    event loop                      engine thread
    generate() ── add ──► cmds ──►  drain cmds -> engine.step() -> outputs
        ▲                                                         │
        └──────────── call_soon_threadsafe(queue.put) ◄───────────┘

A consumer that lags (a slow client, a busy event loop, Ray's stream) gets the outputs
that piled up meanwhile as one merged output: fewer messages when the machine is
busiest, the same tokens in the same order.

Every wait has a deadline: a request's ``timeout_s`` bounds its whole life, and a
client that stops listening (cancellation, closed generator) aborts its request so
its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from cluster.worker_api import merge_outputs
from workers.engine import Engine, RequestOutput
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


def _settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``fut`` unless its waiter already gave up (cancelled it)."""
    if fut.cancelled():
        return
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except InvalidStateError:  # cancelled between the check and the set
        pass


class EngineDeadError(RuntimeError):
    """The engine thread stopped (crashed or shut down); no request can progress."""


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kvrelay-engine", daemon=True)
        self._thread.start()

    # ---- public API (event-loop side) ---------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        timeout_s: float | None = None,
        start: Callable[[], RequestOutput | None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; raises ValueError for bad input, TimeoutError
        past ``timeout_s``, EngineDeadError if the engine stops.

        ``start`` (run on the engine thread) replaces ``engine.add_request`` for a
        request that enters the engine another way, e.g. a decode worker admitting a
        request whose KV arrived from a prefill worker."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if start is None:
            prompt = list(prompt_token_ids)
            start = lambda: self.engine.add_request(request_id, prompt, params)  # noqa: E731
        await self.run_on_engine(lambda: self._start(request_id, start, loop, q))
        finished = False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"request {request_id} exceeded its deadline of {timeout_s}s")
                try:
                    item = await asyncio.wait_for(q.get(), remaining)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"request {request_id} exceeded its deadline of {timeout_s}s") from None
                if isinstance(item, BaseException):
                    raise item
                pending: BaseException | None = None
                while not item.finished and not q.empty():
                    more = q.get_nowait()
                    if isinstance(more, BaseException):
                        pending = more  # after what came before it
                        break
                    item = merge_outputs(item, more)
                yield item
                if pending is not None:
                    raise pending
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # cancelled, timed out, or the consumer went away
                self._submit(lambda: self._abort(request_id))

    async def abort(self, request_id: str) -> bool:
        return await self.run_on_engine(lambda: self._abort(request_id))

    async def run_on_engine(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run ``fn`` on the engine thread between steps (the only safe place to touch
        the engine) and await its result."""
        self._check_alive()
        fut: Future = Future()

        def call() -> None:
            # Runs even if the caller was cancelled meanwhile (an abort must still
            # happen); the result then has nobody to go to, which is fine.
            try:
                result = fn()
            except BaseException as e:  # delivered to the awaiting caller
                _settle(fut, error=e)
            else:
                _settle(fut, result=result)

        self._submit(call)
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    # ---- engine-thread side -------------------------------------------------------

    def _submit(self, fn: Callable[[], None]) -> None:
        self._cmds.put(fn)
        self._wake.set()

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self._error!r}")

    def _start(self, rid: str, start: Callable[[], RequestOutput | None], loop, q: asyncio.Queue) -> None:
        out = start()  # raises ValueError (bad input) to the caller
        self._streams[rid] = (loop, q)
        if out is not None:  # finished on entry (e.g. its first token was EOS)
            self._deliver(rid, out)
            self._streams.pop(rid, None)

    def _abort(self, rid: str) -> bool:
        self._streams.pop(rid, None)
        return self.engine.abort(rid)

    def _deliver(self, rid: str, item: Any) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            return
        loop, q = stream
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self._abort(rid)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        cmd()
                    except Exception:  # a failed command must not take the engine down
                        log.exception("engine command failed")
                if not self.engine.has_unfinished:
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
        except BaseException as e:  # a crashed step: fail every stream, loudly
            log.exception("engine thread crashed")
            self._error = e
            err = EngineDeadError(f"engine crashed: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, err)
            self._streams.clear()
        finally:
            # Fail commands that arrived too late to run.
            while True:
                try:
                    self._cmds.get_nowait()
                except queue.Empty:
                    break
