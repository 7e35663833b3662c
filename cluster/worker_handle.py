"""One way to call a worker, whether it is a Ray actor or an object in this process.

Calls are ``WorkerAPI``'s methods (``handle.call(WorkerAPI.reserve, ...)``), never
strings. Every call and every streamed item has a deadline; a worker that died
surfaces as WorkerDiedError (whatever Ray calls it), a deadline as TimeoutError."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from cluster.worker_api import STREAMING_CALLS, WORKER_CALLS, WorkerDiedError

T = TypeVar("T")


def _call_name(method: Callable[..., Any], streaming: bool) -> str:
    name = getattr(method, "__name__", None)
    if name not in WORKER_CALLS or getattr(method, "__qualname__", "").split(".")[0] != "WorkerAPI":
        raise TypeError(f"not a WorkerAPI call: {method!r} (pass WorkerAPI.<method>)")
    if (name in STREAMING_CALLS) != streaming:
        raise TypeError(f"WorkerAPI.{name} is {'a stream: use stream()' if name in STREAMING_CALLS else 'not a stream: use call()'}")
    return name


def _ray_errors() -> tuple[type[BaseException], ...]:
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:
        return ()
    return (RayActorError, ActorDiedError, ActorUnavailableError)


def unwrap(e: BaseException) -> BaseException:
    """Ray wraps an actor's exception in RayTaskError; give back the original."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) and type(e).__name__.startswith("RayTaskError") else e


class WorkerHandle:
    def __init__(self, role: str, index: int, target: Any, is_ray: bool) -> None:
        self.role, self.index = role, index
        self.target = target  # a Ray ActorHandle or the worker object itself
        self.is_ray = is_ray
        self.name = f"{role}-{index}"

    def __repr__(self) -> str:
        return f"<worker {self.name}>"

    def _failure(self, method: str, e: Exception, timed_out: str) -> Exception:
        """One translation of every way a call can fail: deadline, dead worker, or the
        worker's own exception (unwrapped from Ray's)."""
        if isinstance(e, asyncio.TimeoutError):
            return TimeoutError(f"{self.name}.{method} {timed_out}")
        if isinstance(e, _ray_errors()):
            return WorkerDiedError(f"{self.name} died during {method}: {e}")
        return unwrap(e)

    async def call(self, call: Callable[..., Awaitable[T]], *args: Any, timeout_s: float) -> T:
        method = _call_name(call, streaming=False)
        try:
            if self.is_ray:
                return await asyncio.wait_for(getattr(self.target, method).remote(*args), timeout_s)
            return await asyncio.wait_for(getattr(self.target, method)(*args), timeout_s)
        except Exception as e:
            raise self._failure(method, e, f"did not answer within {timeout_s}s") from None

    async def stream(self, call: Callable[..., AsyncIterator[T]], *args: Any, item_timeout_s: float) -> AsyncIterator[T]:
        """Iterate a streaming method; each item must come within ``item_timeout_s``."""
        method = _call_name(call, streaming=True)
        if self.is_ray:
            gen = getattr(self.target, method).options(num_returns="streaming").remote(*args)
        else:
            gen = getattr(self.target, method)(*args)
        done = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(gen.__anext__(), item_timeout_s)
                    if self.is_ray:
                        item = await asyncio.wait_for(item, item_timeout_s)
                except StopAsyncIteration:
                    done = True
                    return
                except Exception as e:
                    raise self._failure(method, e, f"sent nothing for {item_timeout_s}s") from None
                yield item
        finally:
            if not self.is_ray:
                await gen.aclose()
            elif not done:
                import ray

                try:
                    ray.cancel(gen)  # stop the actor-side generator: the worker aborts the request
                except Exception:  # already finished, or the actor is gone
                    pass
