"""The CPU backend's decode (one index_select per layer into a reused buffer) equals the torch
reference on the same paged cache: padding past each context, GQA head grouping,
a compacted sequence's hidden slots per layer, and prefill rows mixed in."""

from __future__ import annotations

import pytest
import torch

from workers.attention import AttentionBatch, get_backend
from workers.kv_cache import KVCache, KVCacheSpec

LAYERS, HKV, HQ, D, BS = 3, 2, 6, 16, 4


def _batch(lens: list[int], prefill: int | None, hidden: bool) -> tuple[AttentionBatch, KVCache]:
    """Decode sequences of context ``lens`` (one new token each), then optionally one
    prefill chunk of ``prefill`` new tokens after a 5-token cached prefix."""
    spec = KVCacheSpec(LAYERS, HKV, D, BS, torch.float32)
    cache = KVCache(spec, 64, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=gen))
    free = iter(torch.randperm(63, generator=gen).add(1).tolist())  # scattered blocks
    qsl, seq_lens, tables, slots, hid = [0], [], [], [], []
    for i, n in enumerate(lens):
        table = [next(free) for _ in range(-(-n // BS))]
        qsl.append(qsl[-1] + 1)
        seq_lens.append(n)
        tables.append(table)
        slots.append(table[(n - 1) // BS] * BS + (n - 1) % BS)
        # the second sequence hides a different slot range in each layer
        hid.append([(1, 3 + layer) for layer in range(LAYERS)] if hidden and i == 1 else None)
    if prefill:
        n = 5 + prefill
        table = [next(free) for _ in range(-(-n // BS))]
        qsl.append(qsl[-1] + prefill)
        seq_lens.append(n)
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(5, n)]
        hid.append(None)
    batch = AttentionBatch(qsl, seq_lens, tables, torch.tensor(slots), BS, hid if hidden else None)
    return batch, cache


@pytest.mark.parametrize("lens,prefill,hidden", [
    ([9], None, False),
    ([1, 4, 17, 30], None, False),  # padding inside a block and across blocks
    ([8, 8, 8], None, False),  # every context ends on a block boundary
    ([13, 22, 7], 6, False),  # prefill rows in the same step
    ([13, 22, 7], 6, True),  # a compacted sequence hides slots, per layer
])
def test_cpu_decode_equals_reference(lens, prefill, hidden):
    out = {}
    for name in ("torch", "cpu"):
        batch, cache = _batch(lens, prefill, hidden)
        plan = get_backend(name, torch.device("cpu")).plan(batch, cache, HQ)
        gen = torch.Generator().manual_seed(1)
        t = batch.query_start_loc[-1]
        res = []
        for layer in range(LAYERS):
            q, k, v = (torch.randn(t, h, D, generator=gen) for h in (HQ, HKV, HKV))
            res.append(plan.run(layer, q, k, v))
        out[name] = (torch.stack(res), cache.storage.clone())
    torch.testing.assert_close(out["cpu"][0], out["torch"][0], atol=1e-6, rtol=1e-6)
    assert torch.equal(out["cpu"][1], out["torch"][1])  # the same K/V written


def test_auto_is_cpu_on_cpu():
    assert get_backend("auto", torch.device("cpu")).name == "cpu"
