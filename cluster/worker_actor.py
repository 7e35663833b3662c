"""The Ray actor class of every worker: ``WorkerAPI``'s calls, forwarded to the role's
worker (prefill, decode or colocated) built inside the actor process.

Why a shell instead of ``ray.remote(PrefillWorker)``: Ray needs the actor class in the
process that creates the actor, the router replica; the worker classes import torch
and the model, this one does not. It is also the one place that lists what a worker
accepts over the wire (the same methods as ``WorkerAPI``; a test checks they match)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from cluster.worker_api import SamplingParams, TokenLogprobs, TransferDescriptor, WorkerSpec


def worker_class(role: str) -> type:
    """The in-process worker class of a role (imports torch and the model)."""
    if role == "prefill":
        from workers.prefill_worker import PrefillWorker

        return PrefillWorker
    if role == "decode":
        from workers.decode_worker import DecodeWorker

        return DecodeWorker
    if role == "colocated":
        from workers.colocated_worker import ColocatedWorker

        return ColocatedWorker
    raise ValueError(f"unknown worker role {role!r}")


async def _forward(agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Re-yield a worker's stream; closing or cancelling this one closes it (the worker
    then aborts the request and frees its KV)."""
    try:
        async for item in agen:
            yield item
    finally:
        await agen.aclose()


class WorkerActor:
    def __init__(self, spec: WorkerSpec) -> None:
        if (spec.engine.num_threads or 1) > 1:
            # Several workers share the cores: OpenMP threads that spin at every barrier
            # while another process holds the core slow a 2-thread step down 8x (measured
            # on 2 cores); sleeping threads cost little. Read when torch loads, which is
            # below (this actor module is torch-free).
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self._w = worker_class(spec.role)(spec)

    async def health(self):
        return await self._w.health()

    async def get_layout(self):
        return await self._w.get_layout()

    async def stats(self):
        return await self._w.stats()

    async def kv_events(self):
        return await self._w.kv_events()

    async def kv_snapshot(self):
        return await self._w.kv_snapshot()

    async def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        return await self._w.cached_prefix_blocks(block_hashes)

    async def transport_address(self):
        return await self._w.transport_address()

    async def abort(self, request_id: str) -> bool:
        return await self._w.abort(request_id)

    async def drain(self, timeout_s: float = 30.0) -> bool:
        return await self._w.drain(timeout_s)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, compression: str | None = None,
                       rng_state: bytes | None = None):
        async for out in _forward(self._w.generate(request_id, prompt, params, compression, rng_state)):
            yield out

    async def reserve(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_layout,
                      compression: str | None = None):
        return await self._w.reserve(request_id, prompt, params, prefill_layout, compression)

    async def decode(self, request_id: str, first_token: int | None, first_logprobs: TokenLogprobs | None = None,
                     rng_state: bytes | None = None):
        async for out in _forward(self._w.decode(request_id, first_token, first_logprobs, rng_state)):
            yield out

    async def transfer_log(self, request_id: str):
        return await self._w.transfer_log(request_id)

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, desc: TransferDescriptor,
                      rng_state: bytes | None = None):
        return await self._w.prefill(request_id, prompt, params, desc, rng_state)

    async def shadow_decode(self, request_id: str, prompt: list[int], first_token: int, num_tokens: int) -> list[int]:
        return await self._w.shadow_decode(request_id, prompt, first_token, num_tokens)

    async def prefill_log(self, request_id: str):
        return await self._w.prefill_log(request_id)
