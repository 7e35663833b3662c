"""The CPU backend's decode (one index_select per layer into a reused buffer) equals the torch
reference on the same paged cache: padding past each context, GQA head grouping,
a compacted sequence's hidden slots per layer, and prefill rows mixed in."""

from __future__ import annotations

import pytest
import torch

from workers.attention import AttentionBatch, get_backend
from workers.attention.cpu_backend import DecodeContexts
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


class _Seqs:
    """Sequences decoding over many steps on one paged cache: the blocks each owns, its length."""

    def __init__(self, cache: KVCache, gen: torch.Generator) -> None:
        self.cache, self.gen = cache, gen
        self.free = torch.randperm(cache.num_blocks - 1, generator=gen).add(1).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def start(self, sid: str, n: int) -> None:
        """A sequence whose first ``n`` tokens' K/V are already in the cache (random values)."""
        self.tables[sid], self.lens[sid] = [], 0
        self._grow(sid, n)
        for p in range(n):
            blk, off = self.tables[sid][p // BS], p % BS
            self.cache.storage[:, blk, :, off] = torch.randn(self.cache.storage[:, blk, :, off].shape, generator=self.gen)

    def _grow(self, sid: str, n: int) -> None:
        while len(self.tables[sid]) * BS < n:
            self.tables[sid].append(self.free.pop())
        self.lens[sid] = n

    def stop(self, sid: str) -> None:
        self.free += self.tables.pop(sid)
        del self.lens[sid]

    def decode_batch(self, order: list[str]) -> AttentionBatch:
        """One new token for each sequence in ``order``."""
        slots = []
        for sid in order:
            self._grow(sid, self.lens[sid] + 1)
            p = self.lens[sid] - 1
            slots.append(self.tables[sid][p // BS] * BS + p % BS)
        return AttentionBatch(list(range(len(order) + 1)), [self.lens[s] for s in order],
                              [list(self.tables[s]) for s in order], torch.tensor(slots), BS, None, list(order))


def test_decode_contexts_across_steps_equal_reference():
    """The cpu backend keeps decode contexts across steps: sequences join, leave (their slots
    refill), change order, outgrow the copy buffer while one moves, and one is re-prefilled
    into other blocks under the same id. Every
    step equals the torch reference, which gathers from the paged cache each time."""
    spec = KVCacheSpec(LAYERS, HKV, D, BS, torch.float32)
    caches = {name: KVCache(spec, 320, torch.device("cpu")) for name in ("torch", "cpu")}
    backends = {name: get_backend(name, torch.device("cpu"), decode_context_copies=True) for name in caches}
    gen = torch.Generator().manual_seed(2)
    seqs = _Seqs(caches["cpu"], gen)
    for sid, n in [("a", 5), ("b", 17), ("c", 1), ("d", 123)]:  # "d" outgrows 128 tokens at step 5
        seqs.start(sid, n)
    schedule = [["a", "b", "c", "d"]] * 3 + [["d", "a", "c"]] * 2 + [["e", "a", "d", "c"]] * 4 + [["c", "e"]] * 3
    for step, order in enumerate(schedule):
        if step == 5:
            seqs.stop("b")
            seqs.start("e", 9)
        if step == 7:  # "a" preempted and recomputed into new blocks: the same id, other KV
            seqs.stop("a")
            seqs.start("a", 12)
        caches["torch"].storage.copy_(caches["cpu"].storage)
        batch = seqs.decode_batch(order)
        q_gen = torch.Generator().manual_seed(100 + step)
        qkv = [[torch.randn(len(order), h, D, generator=q_gen) for h in (HQ, HKV, HKV)] for _ in range(LAYERS)]
        out = {}
        for name in caches:
            plan = backends[name].plan(batch, caches[name], HQ)
            out[name] = torch.stack([plan.run(layer, *qkv[layer]) for layer in range(LAYERS)])
        torch.testing.assert_close(out["cpu"], out["torch"], atol=1e-6, rtol=1e-6)
        assert torch.equal(caches["cpu"].storage, caches["torch"].storage)
        held = backends["cpu"].contexts
        assert sorted(held.seqs) == sorted(order)  # only this step's sequences are held
        assert sorted(c.slot for c in held.seqs.values()) == list(range(len(order)))  # dense slots
        # Masked rows past a context's end are still read: 0 x NaN would be NaN (a CI failure
        # when the buffer was torch.empty).
        assert torch.isfinite(held.buf).all()


def test_decode_contexts_fall_back_to_gathering_past_the_pool_size():
    """Copies that would outgrow the KV pool are not made: the step gathers instead, still exact."""
    spec = KVCacheSpec(LAYERS, HKV, D, BS, torch.float32)
    caches = {name: KVCache(spec, 80, torch.device("cpu")) for name in ("torch", "cpu")}
    gen = torch.Generator().manual_seed(3)
    seqs = _Seqs(caches["cpu"], gen)
    for sid in "abc":
        seqs.start(sid, 70)  # 4 slots x 128 tokens > 80 blocks x 4 tokens
    caches["torch"].storage.copy_(caches["cpu"].storage)
    batch = seqs.decode_batch(["a", "b", "c"])
    backends = {name: get_backend(name, torch.device("cpu"), decode_context_copies=True) for name in caches}
    out = {}
    for name in caches:
        plan = backends[name].plan(batch, caches[name], HQ)
        q_gen = torch.Generator().manual_seed(7)
        out[name] = [plan.run(layer, *(torch.randn(3, h, D, generator=q_gen) for h in (HQ, HKV, HKV)))
                     for layer in range(LAYERS)]
    held = backends["cpu"].contexts
    assert held.buf is None and not held.seqs and held.refused
    torch.testing.assert_close(torch.stack(out["cpu"]), torch.stack(out["torch"]), atol=1e-6, rtol=1e-6)
    # A batch that would fit still gathers until the engine is idle: no rebuild at the limit.
    small = (["z"], [11], [seqs.tables["a"][:3]])  # 4 slots x 64 tokens: would fit
    assert held.arrange(*small) is None
    backends["cpu"].release()
    assert not held.refused and held.arrange(*small) == [0]


def test_engine_decodes_on_kept_contexts_like_the_reference_and_releases_them(tmp_path):
    """Through the engine (tiny random Llama): requests of different lengths join and finish
    at different steps; greedy tokens equal the torch backend's, the copies are held while
    sequences decode; once the engine has no request left it holds no sequence and keeps the buffer."""
    from tests.unit.test_model_loading import _build_hf, _hf_config, _prompt
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.loader import load_model, resolve_model
    from workers.sampling_params import SamplingParams

    _build_hf(_hf_config(heads=4, kv_heads=2, layers=3), seed=5, path=tmp_path)
    loaded = load_model(resolve_model(str(tmp_path)), dtype=torch.float32, device="cpu")
    tokens, held = {}, []
    threads = torch.get_num_threads()  # the engines pin one thread (a tie-free greedy order); restored below
    for name in ("torch", "cpu"):
        engine = Engine(EngineConfig(num_kv_blocks=128, block_size=16, max_model_len=512, attention_backend=name,
                                     device="cpu", dtype="float32", enable_prefix_caching=False, num_threads=1,
                                     linear_kernel="torch", decode_context_copies=True), loaded=loaded)
        out: dict[str, list[int]] = {}
        for step in range(40):
            if step in (0, 3, 9):  # late joiners, each with its own length and output budget
                for j in range(2):
                    rid = f"s{step}-{j}"
                    engine.add_request(rid, _prompt(20 + 37 * j + step, loaded.config.vocab_size, seed=step + j),
                                       SamplingParams(max_tokens=6 + 5 * j + step, temperature=0.0))
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if name == "cpu" and engine.requests:
                held.append(len(engine.runner.backend.contexts.seqs))
        assert not engine.requests
        tokens[name] = out
        if name == "cpu":
            ctx = engine.runner.backend.contexts
            assert not ctx.seqs and not ctx.refused  # an idle engine holds no sequence...
            buf = ctx.buf  # ...but keeps the buffer, within the KV pool's size, for the next batch
            assert buf is not None and buf.numel() * buf.element_size() <= engine.kv_cache.nbytes
            engine.add_request("again", _prompt(30, loaded.config.vocab_size, seed=99),
                               SamplingParams(max_tokens=4, temperature=0.0))
            while engine.requests:
                engine.step()
            assert ctx.buf is buf
    torch.set_num_threads(threads)
    assert len(tokens["torch"]) == 6 and tokens["cpu"] == tokens["torch"]
    assert max(held) >= 4  # the copies were used, for several sequences at once


def test_decode_context_copies_off_gathers_every_step():
    """``engine.decode_context_copies: false``: the cpu backend keeps nothing across steps."""
    spec = KVCacheSpec(LAYERS, HKV, D, BS, torch.float32)
    caches = {name: KVCache(spec, 320, torch.device("cpu")) for name in ("torch", "cpu")}
    seqs = _Seqs(caches["cpu"], torch.Generator().manual_seed(4))
    for sid in "ab":
        seqs.start(sid, 9)
    backends = {"torch": get_backend("torch", torch.device("cpu")),
                "cpu": get_backend("cpu", torch.device("cpu"), decode_context_copies=False)}
    for step in range(3):
        caches["torch"].storage.copy_(caches["cpu"].storage)
        batch = seqs.decode_batch(["a", "b"])
        out = {}
        for name in caches:
            q_gen = torch.Generator().manual_seed(step)
            plan = backends[name].plan(batch, caches[name], HQ)
            out[name] = torch.stack([plan.run(layer, *(torch.randn(2, h, D, generator=q_gen) for h in (HQ, HKV, HKV)))
                                     for layer in range(LAYERS)])
        torch.testing.assert_close(out["cpu"], out["torch"], atol=1e-6, rtol=1e-6)
        assert backends["cpu"].contexts is None


def test_decode_contexts_grow_by_half_again_not_step_by_step():
    """A batch that fills up one sequence per step while its contexts lengthen regrows the
    copy buffer a few times (each regrow copies every kept context), and a regrow that
    would pass the pool's size falls back to the exact need before refusing."""
    spec = KVCacheSpec(LAYERS, HKV, D, BS, torch.float32)
    cache = KVCache(spec, 1200, torch.device("cpu"))
    held = DecodeContexts(cache)
    seqs = _Seqs(cache, torch.Generator().manual_seed(5))
    buffers, order = [], []
    for step in range(40):
        if len(order) < 32:
            order.append(f"s{step}")
            seqs.start(order[-1], 30 + step)
        batch = seqs.decode_batch(order)
        assert held.arrange(batch.seq_ids, batch.seq_lens, batch.block_tables) is not None
        held.commit(batch.seq_ids, batch.seq_lens, batch.block_tables)
        if not buffers or held.buf is not buffers[-1]:
            buffers.append(held.buf)
    assert held.buf.shape[3] >= 32 and held.buf.shape[4] >= max(seqs.lens.values())
    assert len(buffers) <= 8  # step by step (4 slots, 64 tokens at a time) it was 11 here
    # Near the pool's size: the exact need still fits where half again would not.
    small = DecodeContexts(cache)
    small.buf = torch.zeros(LAYERS, 2, HKV, 28, 128, D)
    small.max_bytes = small.buf[:, :, :, :1].numel() * 4 * 36  # room for 36 slots of 128 tokens
    assert small._grown_shape(30, 100)[3:5] == (32, 128)  # half again (44 slots) would not fit
    assert small._grown_shape(36, 128)[3:5] == (36, 128)
    assert small._grown_shape(37, 100) is None  # not even the exact need


def test_decode_batches_above_the_copy_limit_gather_and_stay_exact():
    """``decode_context_copies_max_seqs``: a decode batch of more sequences gathers (no copy
    is made or kept for it); a smaller one uses the copies. Both equal the reference."""
    spec = KVCacheSpec(LAYERS, HKV, D, BS, torch.float32)
    caches = {name: KVCache(spec, 320, torch.device("cpu")) for name in ("torch", "cpu")}
    seqs = _Seqs(caches["cpu"], torch.Generator().manual_seed(6))
    for sid in "abcd":
        seqs.start(sid, 11)
    backends = {"torch": get_backend("torch", torch.device("cpu")),
                "cpu": get_backend("cpu", torch.device("cpu"), decode_context_copies=True, decode_context_copies_max_seqs=3)}
    for step, order in enumerate([["a", "b", "c", "d"], ["a", "b"], ["a", "b", "c", "d"]]):
        caches["torch"].storage.copy_(caches["cpu"].storage)
        batch = seqs.decode_batch(order)
        out = {}
        for name in caches:
            q_gen = torch.Generator().manual_seed(step)
            plan = backends[name].plan(batch, caches[name], HQ)
            out[name] = torch.stack([plan.run(layer, *(torch.randn(len(order), h, D, generator=q_gen) for h in (HQ, HKV, HKV)))
                                     for layer in range(LAYERS)])
        torch.testing.assert_close(out["cpu"], out["torch"], atol=1e-6, rtol=1e-6)
        held = backends["cpu"].contexts
        if len(order) <= 3:
            assert sorted(held.seqs) == sorted(order)
        else:
            assert plan.contexts is None  # this step gathered
