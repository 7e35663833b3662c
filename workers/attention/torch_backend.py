"""The reference attention backend: paged KV gathered with indexing, then torch SDPA.

Decode sequences (one new token each) run as one padded batch; prefill chunks run
one sequence at a time with a causal mask shifted by the cached prefix length.
A compacted cache whose layers keep different counts hides each layer's padding slots
with a per-layer mask (``AttentionBatch.hidden_slots``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention.batch import AttentionBatch
from workers.kv_cache import KVCache


@dataclass
class _Prefill:
    q_start: int
    q_end: int
    blk: torch.Tensor  # [L] int64 block of each context position
    off: torch.Tensor  # [L] int64 offset inside the block
    mask: torch.Tensor | None  # [n, L] bool, None when the chunk has no cached prefix
    visible: torch.Tensor | None = None  # [layers, L] bool: slots not hidden, per layer


class TorchAttentionPlan:
    def __init__(self, batch: AttentionBatch, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        num_layers = kv_cache.spec.num_layers
        device = kv_cache.storage.device
        bs = batch.block_size
        slots = batch.slot_mapping.to(device)
        self.write_blk, self.write_off = slots // bs, slots % bs  # [T]

        decode = [b for b in range(batch.num_seqs) if batch.query_len(b) == 1]
        self.decode_tokens: torch.Tensor | None = None
        if decode:
            lens = [batch.seq_lens[b] for b in decode]
            max_len = max(lens)
            n_blocks = -(-max_len // bs)
            table = torch.tensor(
                [batch.block_tables[b][:n_blocks] + [0] * (n_blocks - len(batch.block_tables[b][:n_blocks])) for b in decode],
                dtype=torch.int64,
            )  # [Bd, n_blocks]
            pos = torch.arange(max_len)
            self.decode_tokens = torch.tensor([batch.query_start_loc[b] for b in decode], device=device)
            self.decode_blk = table[:, pos // bs].to(device)  # [Bd, Lmax]
            self.decode_off = (pos % bs).expand(len(decode), -1).to(device)  # [Bd, Lmax]
            lens_t = torch.tensor(lens)
            # None when every sequence has the same length (no padding to hide)
            self.decode_mask = None if min(lens) == max_len else (pos[None, :] < lens_t[:, None]).to(device)[:, None, None, :]
            # [layers, Bd, 1, 1, Lmax] when some sequence hides slots in some layer
            self.decode_layer_mask = None
            hidden = batch.hidden_slots
            if hidden is not None and any(hidden[b] is not None for b in decode):
                vis = torch.stack([_visible(hidden[b], max_len, num_layers) for b in decode], dim=1)  # [layers, Bd, Lmax]
                if self.decode_mask is not None:
                    vis &= (pos[None, :] < lens_t[:, None])[None]
                self.decode_layer_mask = vis[:, :, None, None, :].to(device)

        self.prefills: list[_Prefill] = []
        for b in range(batch.num_seqs):
            n = batch.query_len(b)
            if n == 1:
                continue
            L = batch.seq_lens[b]
            pos = torch.arange(L)
            blk = torch.tensor(batch.block_tables[b], dtype=torch.int64)[pos // bs]
            mask = None
            hidden = None if batch.hidden_slots is None else batch.hidden_slots[b]
            if L > n or hidden is not None:  # query i (at slot L - n + i) sees keys 0 .. L - n + i
                mask = (pos[None, :] <= (L - n + torch.arange(n))[:, None]).to(device)
            visible = None if hidden is None else _visible(hidden, L, num_layers).to(device)
            self.prefills.append(_Prefill(batch.query_start_loc[b], batch.query_start_loc[b + 1], blk.to(device), (pos % bs).to(device), mask, visible))

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache.layer(layer)  # [num_blocks, 2, bs, Hkv, D]
        cache[self.write_blk, 0, self.write_off] = k
        cache[self.write_blk, 1, self.write_off] = v
        out = torch.empty_like(q)  # [T, Hq, D]
        if self.decode_tokens is not None:
            out[self.decode_tokens] = self.decode(layer, cache, q[self.decode_tokens])
        for p in self.prefills:
            keys = cache[p.blk, 0, p.off].transpose(0, 1)  # [Hkv, L, D]
            vals = cache[p.blk, 1, p.off].transpose(0, 1)
            qs = q[p.q_start : p.q_end].transpose(0, 1)  # [Hq, n, D]
            mask = p.mask if p.visible is None else p.mask & p.visible[layer][None, :]
            out[p.q_start : p.q_end] = self.prefill(qs, keys, vals, mask).transpose(0, 1)
        return out

    def prefill(self, qs: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[Hq, n, D]: one chunk's queries against its context ``keys``/``vals`` [Hkv, L, D];
        ``mask`` [n, L] (None: plain causal, the chunk is the whole context)."""
        return F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    def decode(self, layer: int, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """[Bd, Hq, D]: one new token per sequence against its whole context."""
        keys = cache[self.decode_blk, 0, self.decode_off].transpose(1, 2)  # [Bd, Hkv, Lmax, D]
        vals = cache[self.decode_blk, 1, self.decode_off].transpose(1, 2)
        mask = self.decode_mask if self.decode_layer_mask is None else self.decode_layer_mask[layer]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, attn_mask=mask, enable_gqa=True)
        return o.squeeze(2)


def _visible(hidden: list[tuple[int, int]] | None, length: int, num_layers: int) -> torch.Tensor:
    """[layers, length] bool: True where a slot is attended to (outside the hidden range)."""
    pos = torch.arange(length)
    if hidden is None:
        return torch.ones(num_layers, length, dtype=torch.bool)
    lo = torch.tensor([h[0] for h in hidden])[:, None]
    hi = torch.tensor([h[1] for h in hidden])[:, None]
    return ~((pos[None, :] >= lo) & (pos[None, :] < hi))


class TorchAttentionBackend:
    name = "torch"

    def plan(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int) -> TorchAttentionPlan:
        return TorchAttentionPlan(batch, kv_cache)

    def release(self) -> None:
        pass  # nothing kept across steps
