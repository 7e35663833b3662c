"""The decode worker: reserves KV blocks for a request before its prefill starts,
receives the missing pages, installs them, and streams tokens from its running batch.
If the pages never arrive (broken link, dead prefill worker, deadline), it recomputes
the prompt itself and counts it: no request is lost to a transfer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import torch

from cluster.kv_handoff import KVReceiver, TransferDescriptor, new_transfer_tag
from cluster.kv_layout import KVLayout
from cluster.transport.base import TransferError
from workers.engine import RequestOutput
from workers.request import TokenLogprobs
from workers.sampling_params import SamplingParams
from workers.worker import WorkerBase, WorkerSpec

log = logging.getLogger(__name__)


class DecodeWorker(WorkerBase):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        # request id -> (arrival task: all pages in + ack sent, params, reserved at)
        self._receivers: dict[str, tuple[asyncio.Task, SamplingParams, float]] = {}
        self.layer_received_at: dict[str, dict[int, float]] = {}
        self._reaper: asyncio.Task | None = None

    async def reserve(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_layout: KVLayout) -> TransferDescriptor:
        """Set blocks aside and post the receives. Raises LayoutMismatchError,
        ValueError (bad input) or CapacityError (no room now)."""
        self.layout.check_peer(prefill_layout, "prefill worker")
        self._start_reaper()
        res = await self.aengine.run_on_engine(lambda: self.engine.reserve(request_id, prompt, params))
        desc = TransferDescriptor(
            request_id=request_id,
            tag=new_transfer_tag(request_id),
            receiver=self.transport.address,
            transport=self.transport.name,
            layout=self.layout,
            start_block=res.num_cached_blocks,
            num_blocks=res.num_missing_blocks,
            timeout_s=self.spec.transfer_timeout_s,
        )
        kv = self.engine.kv_cache.storage
        receiver = KVReceiver(self.transport, desc, kv.dtype, kv.device)
        # Pages land (and are acked) whenever they come, independent of decode() being
        # called yet: the prefill worker never waits on the coordinator.
        arrival = asyncio.get_running_loop().create_task(self._arrive(receiver))
        self._receivers[request_id] = (arrival, params, time.monotonic())
        return desc

    async def _arrive(self, receiver: KVReceiver) -> list[torch.Tensor]:
        layers = await receiver.wait()
        rid = receiver.desc.request_id
        self.layer_received_at[rid] = dict(receiver.layer_received_at)
        while len(self.layer_received_at) > 256:
            self.layer_received_at.pop(next(iter(self.layer_received_at)))
        self.transfer_bytes += receiver.desc.bytes_per_layer * receiver.desc.layout.num_layers
        return layers

    async def decode(
        self,
        request_id: str,
        first_token: int | None,
        first_logprobs: TokenLogprobs | None = None,
        rng_state: torch.Tensor | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's tokens after the first. ``first_token`` None: the
        prefill never produced it (its worker died): recompute everything here."""
        arrival, params, _ = self._receivers.pop(request_id)
        kv = None
        if first_token is not None:
            try:
                kv = await arrival  # bounded by the transfer deadline inside the receiver
            except TransferError as e:
                self.transfer_failures[e.reason] += 1
                log.warning("KV transfer for %s failed (%s): recomputing on the decode worker", request_id, e)
        else:
            arrival.cancel()

        def admit():
            return self.engine.admit_prefilled(request_id, first_token, first_logprobs, kv, rng_state)

        async for out in self.aengine.generate(request_id, [], params, start=admit):
            yield out

    async def transfer_log(self, request_id: str) -> dict[int, float]:
        return self.layer_received_at.get(request_id, {})

    async def abort(self, request_id: str) -> bool:
        entry = self._receivers.pop(request_id, None)
        if entry is not None:
            entry[0].cancel()
        return await super().abort(request_id)

    async def drain(self, timeout_s: float = 30.0) -> bool:
        if self._reaper is not None:
            self._reaper.cancel()
        return await super().drain(timeout_s)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Release reservations nobody came back for (a coordinator died mid-handoff)."""
        limit = self.spec.prefill_timeout_s + self.spec.transfer_timeout_s
        while True:
            await asyncio.sleep(min(5.0, limit / 4))
            now = time.monotonic()
            for rid, (_, _, t0) in list(self._receivers.items()):
                if now - t0 > limit:
                    log.warning("releasing stale reservation %s after %.0fs", rid, now - t0)
                    await self.abort(rid)
