"""Run one scheduled step through the model: flatten the chunks into one token batch,
plan attention once, run every layer, sample where a chunk reached its end."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from workers.attention import AttentionBackend, AttentionBatch
from workers.kv_cache import KVCache
from workers.model.llama import LlamaForCausalLM
from workers.sampler import SampledToken, Sampler
from workers.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, kv_cache: KVCache, backend: AttentionBackend, sampler: Sampler, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.block_size = kv_cache.spec.block_size
        # Observer of every sampled row's raw logits: (request ids, [N, V] float32).
        # For tests and the quality harness; None in serving.
        self.logits_hook: Callable[[list[str], torch.Tensor], None] | None = None
        # Called after each layer with (this step's chunks, layer index), once that
        # layer's K/V are in the cache: how a prefill worker ships a layer's pages
        # while later layers still compute.
        self.layer_observer: Callable[[list[ScheduledChunk], int], None] | None = None

    def build_batch(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        ids, pos, slots = [], [], []
        qsl, seq_lens, tables = [0], [], []
        bs = self.block_size
        for c in chunks:
            r = c.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + c.num_new_tokens
            p = np.arange(start, end)
            ids.append(np.asarray(r.token_ids[start:end], dtype=np.int64))
            pos.append(p)
            slots.append(np.asarray(r.block_ids, dtype=np.int64)[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + c.num_new_tokens)
            seq_lens.append(end)
            tables.append(r.block_ids)
        input_ids = torch.from_numpy(np.concatenate(ids)).to(self.device)
        positions = torch.from_numpy(np.concatenate(pos)).to(self.device)
        slot_mapping = torch.from_numpy(np.concatenate(slots))
        return input_ids, positions, AttentionBatch(qsl, seq_lens, tables, slot_mapping, bs)

    def execute(self, chunks: list[ScheduledChunk]) -> dict[str, SampledToken]:
        """Compute every chunk's KV; returns the sampled token per request that samples."""
        input_ids, positions, batch = self.build_batch(chunks)
        plan = self.backend.plan(batch, self.kv_cache, self.model.config.num_heads)
        observer = self.layer_observer
        after_layer = None if observer is None else (lambda i: observer(chunks, i))
        hidden = self.model(input_ids, positions, plan, after_layer)
        sampling = [(i, c.request) for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return {}
        last = torch.tensor([batch.query_start_loc[i + 1] - 1 for i, _ in sampling], device=hidden.device)
        logits = self.model.compute_logits(hidden[last])  # [N, V] float32
        reqs = [r for _, r in sampling]
        if self.logits_hook is not None:
            self.logits_hook([r.request_id for r in reqs], logits)
        return {r.request_id: s for r, s in zip(reqs, self.sampler.sample(logits, reqs))}
