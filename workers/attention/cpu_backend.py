"""The CPU attention backend: the torch reference with a cheaper decode gather.

The reference gathers each decode sequence's context with a two-tensor index per
layer (block, offset), into a fresh tensor each time: 60 allocations per step whose
pages the kernel must fault in, and a slow generic indexing path. Here one plan
computes, once per step, the row of every context slot in the layer's cache (K and V
rows of a block are ``block_size`` apart), and every layer gathers them per KV head with
``index_select`` into the same preallocated head-major buffer, where each (sequence,
head) context is contiguous. The query heads that share a KV head attend as one group
(GQA without repeating K/V). The attention is SDPA on the same values, so the results
are the reference's within float rounding
(``tests/unit/test_cpu_attention.py``). Prefill chunks run the reference's SDPA call
with a batch dimension added, which sends them to torch's fused (flash) CPU kernel
instead of the unfused math path the reference's 3-D call takes: the same attention,
summed in another order (within 1e-6), 3-5x faster on a 512-token chunk of a 2,048-token
context."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.attention.batch import AttentionBatch
from workers.attention.torch_backend import TorchAttentionPlan
from workers.kv_cache import KVCache


class CPUAttentionPlan(TorchAttentionPlan):
    def __init__(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int) -> None:
        super().__init__(batch, kv_cache)
        if self.decode_tokens is None:
            return
        spec = kv_cache.spec
        bs, hkv, d = spec.block_size, spec.num_kv_heads, spec.head_dim
        bd, length = self.decode_blk.shape
        # Row of each context slot in a layer's cache viewed as [num_blocks * 2 * bs, Hkv, D]:
        # block b's K rows start at 2 * b * bs, its V rows bs later.
        self.k_rows = (self.decode_blk * (2 * bs) + self.decode_off).reshape(-1)
        self.v_rows = self.k_rows + bs
        # Head-major: [K|V, Hkv, Bd * Lmax, D], so that each (sequence, KV head) context
        # is one contiguous [Lmax, D] matrix for the kernel.
        self.buf = torch.empty(2, hkv, bd * length, d, dtype=spec.dtype, device=kv_cache.storage.device)
        self.shape = (hkv, bd, length, d)
        self.group = num_heads // hkv

    def decode(self, layer: int, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        hkv, bd, _, d = self.shape
        heads = cache.view(-1, hkv, d)
        for h in range(hkv):
            torch.index_select(heads[:, h], 0, self.k_rows, out=self.buf[0, h])
            torch.index_select(heads[:, h], 0, self.v_rows, out=self.buf[1, h])
        keys = self.buf[0].view(self.shape).transpose(0, 1)  # [Bd, Hkv, Lmax, D]
        vals = self.buf[1].view(self.shape).transpose(0, 1)
        mask = self.decode_mask if self.decode_layer_mask is None else self.decode_layer_mask[layer]
        # The query heads that share a KV head as that head's query rows: the kernel
        # then reads each context once per KV head, not once per query head.
        o = F.scaled_dot_product_attention(q.view(bd, hkv, self.group, d), keys, vals, attn_mask=mask)
        return o.reshape(q.shape)

    def prefill(self, qs: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # With a batch dimension SDPA takes its flash kernel on CPU (masked or causal);
        # the reference's 3-D call takes the unfused math path, 3-5x slower on long chunks.
        o = F.scaled_dot_product_attention(qs[None], keys[None], vals[None], attn_mask=None if mask is None else mask[None, None],
                                           is_causal=mask is None, enable_gqa=True)
        return o[0]


class CPUAttentionBackend:
    name = "cpu"

    def plan(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int) -> CPUAttentionPlan:
        return CPUAttentionPlan(batch, kv_cache, num_heads)
