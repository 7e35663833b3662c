"""The CUDA attention backend: flashinfer's paged-KV kernels.

One plan per step: a pure-decode batch uses ``BatchDecodeWithPagedKVCacheWrapper``;
anything with a prefill chunk uses ``BatchPrefillWithPagedKVCacheWrapper`` with
``causal=True`` (flashinfer aligns the causal mask to the end of the KV, which is
exactly "new tokens after a cached prefix", and treats one-token queries as decode).
New K/V are written into the pages with plain indexing before the kernel reads them.

A step with a compacted sequence that hides padding slots in some layers (per-layer
budgets, ``AttentionBatch.hidden_slots``) runs on the torch reference plan instead:
flashinfer's paged decode kernel takes no mask, and one plan per layer would cost more
than it saves at these sizes. Uniform budgets hide nothing and stay on flashinfer.
"""

from __future__ import annotations

import torch

from workers.attention.batch import AttentionBatch
from workers.kv_cache import KVCache

_WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferAttentionPlan:
    def __init__(self, backend: "FlashInferAttentionBackend", batch: AttentionBatch, kv_cache: KVCache, num_heads: int) -> None:
        self.kv_cache = kv_cache
        device = backend.device
        bs = batch.block_size
        slots = batch.slot_mapping.to(device)
        self.write_blk, self.write_off = slots // bs, slots % bs

        pages = [batch.block_tables[b][: -(-batch.seq_lens[b] // bs)] for b in range(batch.num_seqs)]
        indptr = [0]
        for p in pages:
            indptr.append(indptr[-1] + len(p))
        kv_indptr = torch.tensor(indptr, dtype=torch.int32, device=device)
        kv_indices = torch.tensor([i for p in pages for i in p], dtype=torch.int32, device=device)
        last_len = torch.tensor([(n - 1) % bs + 1 for n in batch.seq_lens], dtype=torch.int32, device=device)
        spec = kv_cache.spec
        self.is_decode = all(batch.query_len(b) == 1 for b in range(batch.num_seqs))
        if self.is_decode:
            self.wrapper = backend.decode
            self.wrapper.plan(
                kv_indptr, kv_indices, last_len, num_heads, spec.num_kv_heads, spec.head_dim, bs,
                q_data_type=spec.dtype, kv_data_type=spec.dtype,
            )
        else:
            self.wrapper = backend.prefill
            qo_indptr = torch.tensor(batch.query_start_loc, dtype=torch.int32, device=device)
            self.wrapper.plan(
                qo_indptr, kv_indptr, kv_indices, last_len, num_heads, spec.num_kv_heads, spec.head_dim, bs,
                causal=True, q_data_type=spec.dtype, kv_data_type=spec.dtype,
            )

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache.layer(layer)  # [num_blocks, 2, bs, Hkv, D] (NHD)
        cache[self.write_blk, 0, self.write_off] = k
        cache[self.write_blk, 1, self.write_off] = v
        return self.wrapper.run(q.contiguous(), cache)


class FlashInferAttentionBackend:
    name = "flashinfer"

    def __init__(self, device: torch.device) -> None:
        import flashinfer

        self.device = device
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")

    def plan(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int):
        if batch.hidden_slots is not None:
            from workers.attention.torch_backend import TorchAttentionPlan

            return TorchAttentionPlan(batch, kv_cache)
        return FlashInferAttentionPlan(self, batch, kv_cache, num_heads)

    def release(self) -> None:
        pass  # the workspace is reused for the process's lifetime
