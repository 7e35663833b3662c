"""The prefill worker: computes a prompt's KV (reusing its own prefix cache), samples
the first token, and streams the pages the decode worker lacks, layer by layer, while
later layers are still computing."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import torch

from cluster.kv_handoff import KVSender, TransferDescriptor
from cluster.worker_api import PrefillResult
from workers.kv_export import KVExport
from workers.model_runner import LayerDone
from workers.request import rng_state_bytes
from workers.sampling_params import SamplingParams
from workers.scheduler import ScheduledChunk
from workers.worker import WorkerBase, WorkerSpec


class PrefillWorker(WorkerBase):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._exports: dict[str, tuple[KVSender, KVExport]] = {}
        self._layer_times: dict[str, dict[int, float]] = {}
        self._held: dict[str, list[tuple[int, torch.Tensor]]] = {}  # layerwise=False: sent after the last layer
        self._settling: set[asyncio.Task] = set()
        self.recent: dict[str, PrefillResult] = {}  # last results, for probes and tests
        self.engine.runner.layer_observer = self._on_layer

    def _on_layer(self, chunks: list[ScheduledChunk], done: LayerDone) -> None:
        """Engine thread, inside the forward pass: ship this layer of every request
        whose last prompt chunk is in this step."""
        layer = done.layer
        for i, c in enumerate(chunks):
            entry = self._exports.get(c.request.request_id)
            if entry is None:
                continue
            sender, export = entry
            if not c.samples:
                export.observe(layer, done.queries_of(i))
                continue
            self._layer_times[c.request.request_id][layer] = time.time()
            if sender.desc.num_blocks == 0:
                continue
            pages = export.layer_message(c.request, layer, done.queries_of(i))
            if self.spec.layerwise:
                sender.send_layer(layer, pages)
                continue
            held = self._held.setdefault(c.request.request_id, [])
            held.append((layer, pages))
            if layer == self.layout.num_layers - 1:
                for i, buf in self._held.pop(c.request.request_id):
                    sender.send_layer(i, buf)

    async def prefill(
        self, request_id: str, prompt: list[int], params: SamplingParams, desc: TransferDescriptor,
        rng_state: bytes | None = None,
    ) -> PrefillResult:
        """Raises LayoutMismatchError (refused handshake) or ValueError (bad input).
        ``rng_state`` continues a migrated request's sampling RNG."""
        start = time.perf_counter()
        num_blocks = self.engine.block_manager.blocks_for(len(prompt))
        sender = KVSender(self.transport, desc, self.layout, num_blocks)
        export = KVExport(desc, self.engine.kv_cache)
        self._exports[request_id] = (sender, export)
        self._layer_times[request_id] = {}
        first_only = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        holder = {}

        def admit():
            self.engine.add_request(request_id, prompt, first_only, rng_state)
            holder["req"] = req = self.engine.requests[request_id]
            if desc.plan.sparse:  # the selection scores with the whole window's queries
                req.min_uncached_tokens = max(req.min_uncached_tokens, min(len(prompt), desc.plan.window))

        try:
            first = None
            async for out in self.aengine.generate(request_id, prompt, first_only, timeout_s=self.spec.prefill_timeout_s, start=admit):
                first = out
        finally:
            self._exports.pop(request_id, None)
            layer_times = self._layer_times.pop(request_id, {})
        self.count_transfer(desc.plan.preset, sender.bytes_sent, sender.full_bytes, sender.full_bytes_16bit)
        if desc.plan.sparse:
            self.metrics.kept_fraction.labels(desc.plan.preset).observe(export.kept_fraction)
        if export.guard_raised:
            self.compression_fallbacks["guard"] += 1
        # The first token goes back now; the sends finish (and are acked) on their own.
        task = asyncio.get_running_loop().create_task(self._settle(sender))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        req = holder["req"]
        result = PrefillResult(
            request_id=request_id,
            first_token=first.new_token_ids[0],
            first_logprobs=first.new_logprobs[0] if first.new_logprobs else None,
            rng_state=rng_state_bytes(req.generator),
            num_prompt_tokens=len(prompt),
            num_cached_tokens=first.num_cached_tokens,
            bytes_sent=sender.bytes_sent,
            full_bytes=sender.full_bytes,
            full_bytes_16bit=sender.full_bytes_16bit,
            preset=desc.plan.preset,
            kept_fraction=export.kept_fraction,
            guard_raised_layers=export.guard_raised,
            min_mass=min(export.mass),
            encode_seconds=export.seconds,
            layer_computed_at=layer_times,
            layer_sent_at=dict(sender.layer_sent_at),
            prefill_seconds=time.perf_counter() - start,
            prompt_logprobs=first.prompt_logprobs,
        )
        self.recent[request_id] = result
        while len(self.recent) > 256:
            self.recent.pop(next(iter(self.recent)))
        return result

    async def _settle(self, sender: KVSender) -> None:
        outcome = await sender.finish()
        if outcome.ok:
            self.metrics.transfer_seconds.observe(outcome.seconds)
        else:
            self.transfer_failures[outcome.reason or "unknown"] += 1

    async def shadow_decode(self, request_id: str, prompt: list[int], first_token: int, num_tokens: int) -> list[int]:
        """Shadow sampling: greedy tokens (the first one given) on this worker's full,
        exact KV. The prompt was just prefilled here, so its prefix is in the cache and
        only the last block is recomputed."""
        params = SamplingParams(max_tokens=max(num_tokens - 1, 1), temperature=0.0)
        out = [first_token]
        async for o in self.aengine.generate(f"{request_id}#shadow", prompt + [first_token], params,
                                             timeout_s=self.spec.prefill_timeout_s):
            out += o.new_token_ids
        return out[:num_tokens]

    async def prefill_log(self, request_id: str) -> PrefillResult | None:
        return self.recent.get(request_id)
