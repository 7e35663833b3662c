"""The decode worker: reserves KV blocks for a request before its prefill starts,
receives the missing pages, installs them, and streams tokens from its running batch.
If the pages never arrive (broken link, dead prefill worker, deadline), it recomputes
the prompt itself and counts it: no request is lost to a transfer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator


from cluster.compression import CompressionSettings, PayloadPlan
from cluster.kv_handoff import KVReceiver, ReceivedKV, TransferDescriptor, new_transfer_tag
from cluster.worker_api import RequestOutput, TokenLogprobs
from cluster.kv_layout import KVLayout
from cluster.transport.base import TransferError
from workers import kv_selection
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
        self._profiles: dict[str, tuple[float, ...]] = {}
        # budgets "learned": the configured profile, else the one shipped for this model.
        prof = spec.compression.profile
        self._learned = prof if prof != "auto" else kv_selection.shipped_profile(self.layout.model_id, self.layout.num_layers)
        if self._learned is None:
            log.info("no learned budget profile for %s: budgets 'learned' are uniform", self.layout.model_id)
        else:
            self._profile(str(self._learned))  # fail at start on a bad profile, not on a request

    async def reserve(
        self, request_id: str, prompt: list[int], params: SamplingParams, prefill_layout: KVLayout,
        compression: str | None = None,
    ) -> TransferDescriptor:
        """Set blocks aside, choose the payload (``compression``: a preset name, None
        for the deployment's default) and post the receives. Raises
        LayoutMismatchError, ValueError (bad input, unknown preset) or CapacityError."""
        self.layout.check_peer(prefill_layout, "prefill worker")
        label, settings = self.spec.compression.resolve(compression)
        self._start_reaper()
        plans: dict[str, PayloadPlan] = {}

        def suffix_slots(region_start: int, region_tokens: int) -> int:
            plans["plan"] = self._plan(label, settings, len(prompt), region_start, region_tokens)
            return plans["plan"].planned_slots

        res = await self.aengine.run_on_engine(lambda: self.engine.reserve(request_id, prompt, params, suffix_slots))
        bs = self.layout.block_size
        desc = TransferDescriptor(
            request_id=request_id,
            tag=new_transfer_tag(request_id),
            receiver=self.transport.address,
            transport=self.transport.name,
            layout=self.layout,
            start_block=res.num_cached_blocks,
            num_blocks=-(-len(prompt) // bs) - res.num_cached_blocks,
            timeout_s=self.spec.transfer_timeout_s,
            plan=plans["plan"],
        )
        kv = self.engine.kv_cache.storage
        # The pages follow the prefill, which may wait behind other prompts on its worker:
        # posted now, the receives allow for the prefill's deadline as well as the
        # transfer's (decode() bounds the wait after the first token by the transfer's).
        receiver = KVReceiver(self.transport, desc, kv.dtype, kv.device,
                              wait_s=self.spec.prefill_timeout_s + self.spec.transfer_timeout_s)
        # Pages land (and are acked) whenever they come, independent of decode() being
        # called yet: the prefill worker never waits on the coordinator.
        arrival = asyncio.get_running_loop().create_task(self._arrive(receiver))
        self._receivers[request_id] = (arrival, params, time.monotonic())
        return desc

    def _plan(self, label: str, settings: CompressionSettings, prompt_len: int, region_start: int, region_tokens: int) -> PayloadPlan:
        """The payload for a suffix of ``region_tokens`` tokens from ``region_start``:
        a pure function of these numbers and the settings, so every size is known
        before the prefill runs."""
        num_layers = self.layout.num_layers
        sparse = settings.sparse and region_tokens >= max(settings.min_tokens, 1)
        budgets = (region_tokens,) * num_layers
        capacity = region_tokens
        if sparse:
            sel = kv_selection.SelectionParams(settings.window, settings.sinks, settings.kernel, settings.pooling, settings.guard)
            forced = kv_selection.forced_count(prompt_len, region_start, sel)
            budgets = tuple(kv_selection.layer_budgets(
                region_tokens, None if settings.token_budget else settings.keep, num_layers,
                self._profile(settings.budgets), token_budget=settings.token_budget, min_tokens=forced,
            ))
            # With the guard on, any layer may have to go out whole: receive buffers that large.
            capacity = region_tokens if settings.guard > 0 else max(budgets)
        return PayloadPlan(
            preset=label, quantization=settings.quantization, group_size=settings.group_size, sparse=sparse,
            region_start=region_start, region_tokens=region_tokens, budgets=budgets, capacity_tokens=capacity,
            window=settings.window, sinks=settings.sinks, kernel=settings.kernel, pooling=settings.pooling,
            guard=settings.guard,
        )

    def _profile(self, budgets: str):
        """"uniform" | "pyramid" | the weights of a profile file (loaded once); "learned"
        is the deployment's profile, else the one shipped for the model, else uniform."""
        if budgets == "learned":
            budgets = "uniform" if self._learned is None else str(self._learned)
        if budgets in ("uniform", "pyramid"):
            return budgets
        if budgets not in self._profiles:
            prof = kv_selection.load_profile(budgets)
            if prof.num_layers != self.layout.num_layers:
                raise ValueError(f"budget profile {budgets}: {prof.num_layers} layers, the model has {self.layout.num_layers}")
            self._profiles[budgets] = prof.weights
        return self._profiles[budgets]

    async def _arrive(self, receiver: KVReceiver) -> ReceivedKV:
        kv = await receiver.wait()
        rid = receiver.desc.request_id
        self.layer_received_at[rid] = dict(receiver.layer_received_at)
        while len(self.layer_received_at) > 256:
            self.layer_received_at.pop(next(iter(self.layer_received_at)))
        self.transfer_bytes += kv.bytes_received
        return kv

    async def decode(
        self,
        request_id: str,
        first_token: int | None,
        first_logprobs: TokenLogprobs | None = None,
        rng_state: bytes | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's tokens after the first. ``first_token`` None: the
        prefill never produced it (its worker died): recompute everything here."""
        arrival, params, _ = self._receivers.pop(request_id)
        kv = None
        if first_token is not None:
            try:
                # The prefill is done (its first token is here) and has sent its layers as
                # it computed them: what is left of the transfer gets the transfer deadline.
                kv = await asyncio.wait_for(arrival, self.spec.transfer_timeout_s)
            except asyncio.TimeoutError:
                self.transfer_failures["timeout"] += 1
                log.warning("KV for %s not here %.0fs after its first token: recomputing on the decode worker",
                            request_id, self.spec.transfer_timeout_s)
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
