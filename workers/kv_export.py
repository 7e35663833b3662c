"""One request's outgoing KV on the prefill worker: what each layer's message holds,
built on the engine thread right after that layer's K/V are in the cache.

    identity plan:  the suffix's pages, as they sit in the cache
    otherwise:      SnapKV selection (sparse plans) ─► gather kept tokens per KV head
                    ─► quantize + frame (cluster.kv_codec) ─► one uint8 message

Selection runs after the full-attention prefill of the layer (never during it) and
needs only this layer's window queries and keys, so a selected layer still streams
while later layers compute. The window queries of a prompt whose last chunk is shorter
than the window are kept from the earlier chunks (``observe``).
"""

from __future__ import annotations

import time

import torch

from cluster import kv_codec
from cluster.kv_handoff import TransferDescriptor
from workers import kv_selection
from workers.kv_cache import KVCache
from workers.request import Request


class KVExport:
    def __init__(self, desc: TransferDescriptor, kv_cache: KVCache) -> None:
        self.desc, self.plan, self.kv_cache = desc, desc.plan, kv_cache
        num_layers = kv_cache.spec.num_layers
        self.quantizer = None if self.plan.identity else desc.quantizer()
        self.select = None
        if self.plan.sparse:
            p = self.plan
            self.select = kv_selection.SelectionParams(p.window, p.sinks, p.kernel, p.pooling, p.guard)
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None  # [tokens] block ids, offsets
        self._q_tail: dict[int, torch.Tensor] = {}  # layer -> [<= window, Hq, D] latest queries
        self.kept = list(self.plan.budgets)  # tokens kept per layer, as sent
        self.mass = [1.0] * num_layers  # window attention mass the kept tokens hold, per layer
        self.guard_raised = 0  # layers the guard sent with more tokens than planned
        self.seconds = 0.0  # selection + gather + encode, all layers

    def observe(self, layer: int, queries: torch.Tensor) -> None:
        """A prompt chunk that is not the last: remember its window-tail queries."""
        if self.select is None:
            return
        prev = self._q_tail.get(layer)
        q = queries if prev is None else torch.cat([prev, queries])
        self._q_tail[layer] = q[-self.select.window :].clone()

    def layer_message(self, req: Request, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """The contiguous buffer to send for ``layer``; ``queries`` [n, Hq, D] are the
        last chunk's (post-RoPE)."""
        t0 = time.perf_counter()
        d, bs = self.desc, self.kv_cache.spec.block_size
        cache = self.kv_cache.layer(layer)  # [num_blocks, 2, bs, Hkv, D]
        device = cache.device
        if self.plan.identity:
            ids = torch.tensor(req.block_ids[d.start_block : d.start_block + d.num_blocks], device=device)
            out = cache[ids]  # [n, 2, bs, Hkv, D], a contiguous copy
        else:
            start = self.plan.region_start
            if self._slots is None:  # the same (block, offset) of every token for all layers
                first = 0 if self.select is not None else start  # selection scores against the whole prompt
                s = torch.arange(first, req.num_prompt_tokens, device=device)
                table = torch.tensor(req.block_ids, dtype=torch.int64, device=device)
                self._slots = (table[s // bs], s % bs)
            kv = cache[self._slots[0], :, self._slots[1]]  # [tokens, 2, Hkv, D]
            keys, values = kv[:, 0], kv[:, 1]
            if self.select is not None:
                prev = self._q_tail.pop(layer, None)
                q = queries if prev is None else torch.cat([prev, queries])
                q = q[-self.select.window :]
                sel = kv_selection.select_layer(q, keys, start, self.plan.budgets[layer], self.select)
                idx = sel.indices.T  # [n, Hkv] token index per kept slot and head
                heads = torch.arange(idx.shape[1], device=device)[None, :]
                k, v = keys[idx, heads], values[idx, heads]  # [n, Hkv, D]
                self.kept[layer], self.mass[layer] = sel.num_kept, sel.mass
                self.guard_raised += sel.guard_raised
            else:
                k, v = keys, values
            out = kv_codec.encode_layer(self.quantizer, layer, k.contiguous(), v.contiguous())
        if out.is_cuda:  # UCX reads the memory directly: the copy must be done
            torch.cuda.current_stream().synchronize()
        self.seconds += time.perf_counter() - t0
        return out

    @property
    def kept_fraction(self) -> float:
        """Mean over layers of the shipped suffix's tokens kept."""
        region = self.plan.region_tokens
        return 1.0 if region == 0 else sum(self.kept) / (len(self.kept) * region)
