"""Decoding on a compacted cache equals full-cache decoding with an attention mask
that hides exactly the dropped entries (tiny random Llama, logits within 1e-4).

The compacted side is the real engine path (reserve → sparse payload → install into
private blocks → decode at the true positions, per-layer padding hidden); the oracle
(tests/compacted_oracle.py) attends over the dense, uncompacted prompt KV with a mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.compacted_oracle import compacted_run, masked_run, prefill_kv, random_indices
from tests.unit.test_model_loading import _build_hf, _hf_config, _prompt
from workers.config import EngineConfig
from workers.engine import Engine
from workers.loader import load_model, resolve_model
from workers.sampling_params import SamplingParams

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    _build_hf(_hf_config(heads=4, kv_heads=2, layers=3), seed=7, path=path)
    return load_model(resolve_model(str(path)), dtype=torch.float32, device="cpu")


_BACKEND = ["torch"]


@pytest.fixture(autouse=True, params=["torch", "cpu"])
def backend(request):
    """Every test on the reference backend and on the CPU backend."""
    _BACKEND[0] = request.param
    return request.param


def _engine(loaded, prefix_caching=False):
    return Engine(EngineConfig(num_kv_blocks=64, block_size=16, max_model_len=512, attention_backend=_BACKEND[0],
                               device="cpu", dtype="float32", enable_prefix_caching=prefix_caching), loaded=loaded)


@pytest.mark.parametrize("counts", [[40, 40, 40], [50, 20, 33]], ids=["uniform", "per-layer (hidden padding)"])
def test_compacted_decode_equals_masked_full_decode(tiny, counts):
    cfg = tiny.config
    prompt = _prompt(97, cfg.vocab_size, seed=3)
    engine = _engine(tiny)
    first, kv, _ = prefill_kv(engine, prompt)
    indices = random_indices(cfg.num_layers, cfg.num_kv_heads, 0, len(prompt), counts, seed=11)
    tokens, logits = compacted_run(engine, prompt, first, kv, indices, steps=6)
    assert len(tokens) == 6
    want = masked_run(tiny.model, len(prompt), kv, indices, 0, [first] + tokens[:-1])
    for got, ref in zip(logits, want):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_held_exact_prefix_plus_compacted_suffix(tiny):
    """The decode side holds the first 3 blocks exactly (prefix cache); only the rest is
    compacted. The held blocks stay shared; the compacted ones never enter the cache."""
    cfg = tiny.config
    prompt = _prompt(120, cfg.vocab_size, seed=5)
    engine = _engine(tiny, prefix_caching=True)
    first, kv, _ = prefill_kv(engine, prompt)
    # The decode engine holds only the first 3 blocks: a warm-up with just that prefix.
    engine2 = _engine(tiny, prefix_caching=True)
    engine2.generate([prompt[:48] + [1]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    counts = [30, 25, 40]
    indices = random_indices(cfg.num_layers, cfg.num_kv_heads, 48, len(prompt), counts, seed=2)
    events_before = len(engine2.block_manager.take_events())
    tokens, logits = compacted_run(engine2, prompt, first, kv, indices, steps=5)
    want = masked_run(tiny.model, len(prompt), kv, indices, 48, [first] + tokens[:-1])
    for got, ref in zip(logits, want):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    stored = [e for e in engine2.block_manager.take_events() if type(e).__name__ == "BlockStored"]
    assert events_before >= 1 and not stored, "compacted blocks must never be registered in the prefix cache"
    # a later identical prompt finds only the 3 exact blocks
    from workers.request import Request

    probe = Request("probe", prompt, SamplingParams(max_tokens=1), 16)
    assert engine2.block_manager.match_prefix(probe.block_hashes).num_blocks == 3


def test_failed_compacted_handoff_recomputes_at_full_size(tiny):
    cfg = tiny.config
    prompt = _prompt(97, cfg.vocab_size, seed=3)
    engine = _engine(tiny)
    first, kv, _ = prefill_kv(engine, prompt)
    indices = random_indices(cfg.num_layers, cfg.num_kv_heads, 0, len(prompt), [40, 40, 40], seed=1)
    # Compacted, then preempted by hand through the scheduler's own path.
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    tokens, _ = compacted_run(engine, prompt, first, kv, indices, steps=3, request_id="c1")
    assert len(tokens) == 3
    engine.reserve("c2", prompt, params, lambda s, r: 40)
    req = engine.scheduler.waiting_remote["c2"]
    engine.scheduler.remote_kv_failed(req)  # what a broken transfer does: recompute here
    assert req.compacted is None and req.block_ids == [] and req in engine.scheduler.waiting
    out = []
    while "c2" in engine.requests:
        out += [t for o in engine.step() if o.request_id == "c2" for t in o.new_token_ids]
    full = _engine(tiny).generate([prompt], params)[0]
    assert out == full  # recomputed at full size: exactly the uncompressed output


def test_preempted_compacted_request_is_recomputed_at_full_size_and_counted(tiny):
    """A pool too small for two requests: the compacted one (admitted last) is preempted,
    loses its compaction (counted as a "preempted" fallback), is recomputed at full size
    from the prompt and its tokens so far, and completes."""
    cfg = tiny.config
    prompt = _prompt(97, cfg.vocab_size, seed=3)
    # decode_reserve_tokens=0: the reservation gets room for its prompt alone, so the two
    # sequences outgrow the pool and one is preempted, the path under test (with the
    # default reserve the reservation would wait instead: tests/unit/test_decode_reserve.py).
    engine = Engine(EngineConfig(num_kv_blocks=10, block_size=16, max_model_len=512, attention_backend="torch",
                                 device="cpu", dtype="float32", enable_prefix_caching=False,
                                 decode_reserve_tokens=0), loaded=tiny)
    first, kv, _ = prefill_kv(engine, prompt)
    other = _prompt(60, cfg.vocab_size, seed=9)
    engine.add_request("other", other, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    engine.step()  # "other" runs first: 4 blocks, growing to 8
    indices = random_indices(cfg.num_layers, cfg.num_kv_heads, 0, len(prompt), [40, 40, 40], seed=1)
    tokens, _ = compacted_run(engine, prompt, first, kv, indices, steps=30)  # 3 blocks, growing
    assert len(tokens) == 30
    assert engine.stats.compression_fallbacks.get("preempted", 0) >= 1
    assert engine.stats.preemptions >= 1
