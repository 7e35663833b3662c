"""The CPU attention backend: the torch reference with a cheaper decode and SDPA's fused prefill.

The reference gathers every decode sequence's whole context with a two-tensor index per
layer into a fresh padded tensor. Here one plan computes, once per step, the row of every
context slot in the layer's cache, and every layer gathers them per KV head with
``index_select`` into one reused head-major buffer. With ``decode_context_copies`` on, the
backend instead keeps each running decode sequence's context as a contiguous, head-major
copy across steps (:class:`DecodeContexts`): a step appends the new token's K/V and
attends to the copy in place; a context is gathered once, when the sequence first
decodes (or when its copy no longer matches its blocks). The copies take at most as much
memory as the KV pool (once they would not fit, steps gather until the engine is idle);
the buffer grows by half again when it must, and stays allocated while the worker idles.
Decode batches of more than ``decode_context_copies_max_seqs`` (16) sequences gather
instead: served at concurrency 32 on 2 cores the copies were slower than gathering.
In process (an ad-hoc measurement) that made the decode step 1.2-1.9x faster; served side
by side on a 2-core host, 1.02-1.59x output tok/s at concurrency 8 and on
prefix_repetition (``bench/results/peer.md``), so it is on by default
(``engine.decode_context_copies``). Either way the query
heads that share a KV head attend as one group (GQA without repeating K/V), and the
attention is SDPA on the same values, so the results are the reference's within float
rounding (``tests/unit/test_cpu_attention.py``).

Prefill chunks run the reference's SDPA call with a batch dimension added, which sends
them to torch's fused (flash) CPU kernel instead of the unfused math path the
reference's 3-D call takes: the same attention, summed in another order (within 1e-6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention.batch import AttentionBatch
from workers.attention.torch_backend import TorchAttentionPlan
from workers.kv_cache import KVCache

_SLOTS, _TOKENS = 4, 64  # capacity grows in these steps (sequences, context tokens)


@dataclass
class _Context:
    slot: int
    length: int  # context tokens the copy holds
    table: tuple[int, ...]  # the blocks it was copied from (a prefix of the sequence's table)


class DecodeContexts:
    """Running decode sequences' contexts, contiguous per (KV head, sequence), across steps.

    ``buf`` is ``[layers, K|V, Hkv, slots, tokens, D]``; sequence ids map to dense slots
    ``0 .. B-1``, so a step's batch is ``buf[layer, kv, :, :B, :Lmax]`` with no copy."""

    def __init__(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self.max_bytes = kv_cache.nbytes  # never more than the paged pool itself
        self.buf: torch.Tensor | None = None
        self.seqs: dict[str, _Context] = {}
        # Once the copies would not fit, gather until the engine is idle again: a batch
        # that hovers at the limit would otherwise rebuild every copy each time it fits.
        self.refused = False

    def clear(self) -> None:
        self.buf, self.seqs = None, {}

    def arrange(self, ids: list[str], lens: list[int], tables: list[list[int]]) -> list[int] | None:
        """Slot of each decode sequence (``lens`` count the new token, whose K/V the step
        writes with :meth:`append`). Drops the sequences not in this step, keeps the slots
        dense, grows the buffer and copies in the sequences new to it. None (and nothing
        kept) when the buffer would outgrow the KV pool's size, and from then on until
        the engine is idle (:meth:`CPUAttentionBackend.release`)."""
        if self.refused:
            return None
        keep: dict[str, _Context] = {}
        for i, sid in enumerate(ids):
            c = self.seqs.get(sid)
            if c is not None and c.length == lens[i] - 1 and tuple(tables[i][: len(c.table)]) == c.table:
                keep[sid] = c
        n = len(ids)
        free = sorted(set(range(n)) - {c.slot for c in keep.values()})
        moves = []  # (from, to): kept sequences outside 0 .. n-1 move into the holes
        for c in keep.values():
            if c.slot >= n:
                moves.append((c.slot, free.pop(0)))
                c.slot = moves[-1][1]
        old, need_len = self.buf, max(lens)
        if old is None or old.shape[3] < n or old.shape[4] < need_len:
            shape = self._grown_shape(n, need_len)
            if shape is None:
                self.clear()
                self.refused = True
                return None
            # Zeros, not empty: rows past a sequence's length are masked out, but a masked
            # weight of 0 times an uninitialised NaN is NaN (CI hit it once).
            self.buf = torch.zeros(shape, dtype=old.dtype if old is not None else self.kv_cache.spec.dtype,
                                   device=self.kv_cache.storage.device)
            if old is not None:  # everything the old buffer held, in one copy; the moves below
                self.buf[:, :, :, : old.shape[3], : old.shape[4]] = old
        for fr, to in moves:
            length = next(c.length for c in keep.values() if c.slot == to)
            self.buf[:, :, :, to, :length] = self.buf[:, :, :, fr, :length]
        bs = self.kv_cache.spec.block_size
        slots_out = []
        for i, sid in enumerate(ids):
            c = keep.get(sid)
            if c is None:  # new to the buffer: copy its context in once
                c = keep[sid] = _Context(free.pop(0), lens[i] - 1, tuple(tables[i]))
                if c.length:
                    pos = torch.arange(c.length)
                    blk = torch.tensor(tables[i], dtype=torch.int64)[pos // bs].to(self.buf.device)
                    ctx = self.kv_cache.storage[:, blk, :, (pos % bs).to(self.buf.device)]  # [L, layers, 2, Hkv, D]
                    self.buf[:, :, :, c.slot, : c.length] = ctx.permute(1, 2, 3, 0, 4)
            slots_out.append(c.slot)
        self.seqs = keep
        return slots_out

    def _grown_shape(self, n: int, need_len: int) -> tuple[int, ...] | None:
        """The buffer's next shape for ``n`` sequences of up to ``need_len`` tokens: each
        dimension that is too small grows by half again (at least to what is needed,
        in steps of _SLOTS / _TOKENS), so that a batch that fills up over many steps
        regrows a few times, not every few steps (each regrow copies every kept
        context: at 32 sequences that was 16% of a served decode worker's time). None
        when even the exact need would outgrow the KV pool's size."""
        spec, old = self.kv_cache.spec, self.buf
        have_s, have_t = (0, 0) if old is None else (old.shape[3], old.shape[4])

        def up(need: int, have: int, step: int, grow: bool) -> int:
            if need <= have:
                return have
            want = max(need, int(have * 1.5)) if grow else need
            return -(-want // step) * step

        for grow in (True, False):
            shape = (spec.num_layers, 2, spec.num_kv_heads, up(n, have_s, _SLOTS, grow),
                     up(need_len, have_t, _TOKENS, grow), spec.head_dim)
            if torch.Size(shape).numel() * self.kv_cache.storage.element_size() <= self.max_bytes:
                return shape
        return None

    def append(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new token per sequence (``k``, ``v``: [B, Hkv, D]) at ``pos`` of its slot."""
        self.buf[layer, 0][:, slots, pos] = k.transpose(0, 1)
        self.buf[layer, 1][:, slots, pos] = v.transpose(0, 1)

    def commit(self, ids: list[str], lens: list[int], tables: list[list[int]]) -> None:
        """After the last layer wrote the new tokens: the copies now hold ``lens`` tokens."""
        for sid, n, t in zip(ids, lens, tables):
            c = self.seqs[sid]
            c.length, c.table = n, tuple(t)


class CPUAttentionPlan(TorchAttentionPlan):
    def __init__(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int, contexts: DecodeContexts | None,
                 max_seqs: int = 1 << 30) -> None:
        super().__init__(batch, kv_cache)
        self.contexts = None
        if self.decode_tokens is None:
            return
        spec = kv_cache.spec
        hkv, d = spec.num_kv_heads, spec.head_dim
        self.group = num_heads // hkv
        self.last_layer = spec.num_layers - 1
        decode = [b for b in range(batch.num_seqs) if batch.query_len(b) == 1]
        if contexts is not None and batch.seq_ids is not None and self.decode_layer_mask is None and len(decode) <= max_seqs:
            ids = [batch.seq_ids[b] for b in decode]
            lens = [batch.seq_lens[b] for b in decode]
            tables = [batch.block_tables[b] for b in decode]
            slots = contexts.arrange(ids, lens, tables)
            if slots is not None:
                # The plan's decode rows in slot order, so that slot i is row i of the batch.
                order = sorted(range(len(decode)), key=slots.__getitem__)
                self.contexts = contexts
                self.ctx_commit = ([ids[i] for i in order], [lens[i] for i in order], [tables[i] for i in order])
                device = kv_cache.storage.device
                self.decode_tokens = torch.tensor([batch.query_start_loc[decode[i]] for i in order], device=device)
                sorted_lens = torch.tensor(self.ctx_commit[1])
                self.ctx_slots = torch.arange(len(decode), device=device)
                self.ctx_pos = (sorted_lens - 1).to(device)
                max_len = int(sorted_lens.max())
                self.ctx_len = max_len
                self.decode_mask = None if int(sorted_lens.min()) == max_len else \
                    (torch.arange(max_len)[None, :] < sorted_lens[:, None]).to(device)[:, None, None, :]
                return
        # Gather per step: the context of each decode slot, per KV head, into one buffer.
        # Row of each context slot in a layer's cache viewed as [num_blocks * 2 * bs, Hkv, D]:
        # block b's K rows start at 2 * b * bs, its V rows bs later.
        bs = spec.block_size
        bd, length = self.decode_blk.shape
        self.k_rows = (self.decode_blk * (2 * bs) + self.decode_off).reshape(-1)
        self.v_rows = self.k_rows + bs
        self.buf = torch.empty(2, hkv, bd * length, d, dtype=spec.dtype, device=kv_cache.storage.device)
        self.shape = (hkv, bd, length, d)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.contexts is not None:
            self.contexts.append(layer, self.ctx_slots, self.ctx_pos, k[self.decode_tokens], v[self.decode_tokens])
        out = super().run(layer, q, k, v)
        if self.contexts is not None and layer == self.last_layer:
            self.contexts.commit(*self.ctx_commit)
        return out

    def decode(self, layer: int, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        bd, d = q.shape[0], q.shape[-1]
        if self.contexts is not None:
            kv = self.contexts.buf[layer, :, :, :bd, : self.ctx_len]  # [2, Hkv, Bd, Lmax, D]
            keys, vals = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # [Bd, Hkv, Lmax, D]
        else:
            hkv = self.shape[0]
            heads = cache.view(-1, hkv, d)
            for h in range(hkv):
                torch.index_select(heads[:, h], 0, self.k_rows, out=self.buf[0, h])
                torch.index_select(heads[:, h], 0, self.v_rows, out=self.buf[1, h])
            keys = self.buf[0].view(self.shape).transpose(0, 1)  # [Bd, Hkv, Lmax, D]
            vals = self.buf[1].view(self.shape).transpose(0, 1)
        mask = self.decode_mask if self.decode_layer_mask is None else self.decode_layer_mask[layer]
        # The query heads that share a KV head as that head's query rows: the kernel
        # then reads each context once per KV head, not once per query head.
        o = F.scaled_dot_product_attention(q.view(bd, keys.shape[1], self.group, d), keys, vals, attn_mask=mask)
        return o.reshape(q.shape)

    def prefill(self, qs: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # With a batch dimension SDPA takes its flash kernel on CPU (masked or causal);
        # the reference's 3-D call takes the unfused math path, 3-5x slower on long chunks.
        o = F.scaled_dot_product_attention(qs[None], keys[None], vals[None], attn_mask=None if mask is None else mask[None, None],
                                           is_causal=mask is None, enable_gqa=True)
        return o[0]


class CPUAttentionBackend:
    name = "cpu"

    def __init__(self, decode_context_copies: bool = True, max_seqs: int = 16) -> None:
        self.copies = decode_context_copies
        self.max_seqs = max_seqs  # decode batches larger than this gather
        self.contexts: DecodeContexts | None = None

    def plan(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int) -> CPUAttentionPlan:
        if not self.copies:
            return CPUAttentionPlan(batch, kv_cache, num_heads, None)
        if self.contexts is None or self.contexts.kv_cache is not kv_cache:
            self.contexts = DecodeContexts(kv_cache)
        return CPUAttentionPlan(batch, kv_cache, num_heads, self.contexts, self.max_seqs)

    def release(self) -> None:
        if self.contexts is not None:
            # An idle worker keeps no sequence, but keeps the buffer (at most the KV pool's
            # size, as while it decodes): fresh memory of that size costs page faults on
            # its first write, and reallocating it after every idle spell made regrows
            # 16% of a served decode worker's time (torch.zeros, in the c32 profile).
            self.contexts.seqs = {}
            self.contexts.refused = False
