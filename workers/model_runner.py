"""Run one scheduled step through the model: flatten the chunks into one token batch,
plan attention once, run every layer, sample where a chunk reached its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workers.attention import AttentionBackend, AttentionBatch
from workers.kv_cache import KVCache
from workers.model.llama import LlamaForCausalLM
from workers.prompt_logprobs import fill_prompt_logprobs
from workers.sampler import SampledToken, Sampler
from workers.scheduler import ScheduledChunk


@dataclass(frozen=True)
class LayerDone:
    """What a layer observer sees once a layer's K/V are in the cache."""

    layer: int
    queries: torch.Tensor  # [T, Hq, D] post-RoPE queries of every new token of the step
    query_start_loc: list[int]  # [B + 1]: chunk i's tokens are [qsl[i], qsl[i+1])

    def queries_of(self, i: int) -> torch.Tensor:
        """[n_i, Hq, D]: the queries of chunk i's new tokens."""
        return self.queries[self.query_start_loc[i] : self.query_start_loc[i + 1]]


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
        # Called after each layer with (this step's chunks, LayerDone), once that
        # layer's K/V are in the cache: how a prefill worker selects and ships a
        # layer's KV while later layers still compute.
        self.layer_observer: Callable[[list[ScheduledChunk], LayerDone], None] | None = None

    def build_batch(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """Positions (RoPE) are logical; slots and context lengths count KV entries,
        which are fewer when a request's prompt KV was compacted."""
        ids, pos, slots = [], [], []
        qsl, seq_lens, tables = [0], [], []
        hidden: list[list[tuple[int, int]] | None] = []
        bs = self.block_size
        num_layers = self.kv_cache.spec.num_layers
        for c in chunks:
            r = c.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + c.num_new_tokens
            p = np.arange(start, end)
            kv = p - r.num_dropped_tokens  # KV slot index of each new token
            ids.append(np.asarray(r.token_ids[start:end], dtype=np.int64))
            pos.append(p)
            slots.append(np.asarray(r.block_ids, dtype=np.int64)[kv // bs] * bs + kv % bs)
            qsl.append(qsl[-1] + c.num_new_tokens)
            seq_lens.append(end - r.num_dropped_tokens)
            tables.append(r.block_ids)
            cmp = r.compacted
            hidden.append([cmp.hidden(i) for i in range(num_layers)] if cmp is not None and cmp.has_hidden else None)
        input_ids = torch.from_numpy(np.concatenate(ids)).to(self.device)
        positions = torch.from_numpy(np.concatenate(pos)).to(self.device)
        slot_mapping = torch.from_numpy(np.concatenate(slots))
        any_hidden = hidden if any(h is not None for h in hidden) else None
        seq_ids = [c.request.request_id for c in chunks]
        return input_ids, positions, AttentionBatch(qsl, seq_lens, tables, slot_mapping, bs, any_hidden, seq_ids)

    def execute(self, chunks: list[ScheduledChunk]) -> dict[str, SampledToken]:
        """Compute every chunk's KV; returns the sampled token per request that samples."""
        input_ids, positions, batch = self.build_batch(chunks)
        plan = self.backend.plan(batch, self.kv_cache, self.model.config.num_heads)
        observer = self.layer_observer
        after_layer = None
        if observer is not None:
            qsl = batch.query_start_loc

            def after_layer(i: int, q: torch.Tensor) -> None:
                observer(chunks, LayerDone(i, q, qsl))
        hidden = self.model(input_ids, positions, plan, after_layer)
        for i, c in enumerate(chunks):
            r = c.request
            if r.prompt_logprobs is not None and r.num_computed_tokens < r.num_prompt_tokens:
                qsl = batch.query_start_loc
                fill_prompt_logprobs(r, r.num_computed_tokens, r.num_computed_tokens + c.num_new_tokens,
                                     hidden[qsl[i] : qsl[i + 1]], self.model.compute_logits)
        sampling = [(i, c.request) for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return {}
        last = torch.tensor([batch.query_start_loc[i + 1] - 1 for i, _ in sampling], device=hidden.device)
        logits = self.model.compute_logits(hidden[last])  # [N, V] float32
        reqs = [r for _, r in sampling]
        if self.logits_hook is not None:
            self.logits_hook([r.request_id for r in reqs], logits)
        return {r.request_id: s for r, s in zip(reqs, self.sampler.sample(logits, reqs))}
