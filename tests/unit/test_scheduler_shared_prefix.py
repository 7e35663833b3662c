"""A request whose next prompt block is being computed by a running request waits for
it instead of computing the same prefix a second time in the same steps."""

from __future__ import annotations

import torch

from workers.config import EngineConfig
from workers.engine import Engine
from workers.loader import random_model
from workers.model.config import ModelConfig
from workers.sampling_params import SamplingParams

TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=512, eos_token_ids=(0,))
SHARED = [(7 * i) % 120 + 1 for i in range(128)]  # 8 blocks of 16
PROMPTS = [SHARED + [100 + i] * 16 for i in range(3)]  # + one distinct block each
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)


def _engine(prefix_caching: bool = True) -> Engine:
    # chunk 64 under a 256-token budget: without the wait, all three requests would
    # start their prefill of the shared blocks in the very first step.
    cfg = EngineConfig(device="cpu", num_kv_blocks=64, chunk_size=64, max_num_batched_tokens=256,
                       enable_prefix_caching=prefix_caching)
    return Engine(cfg, loaded=random_model(TINY, torch.float32))


def _run_burst(engine: Engine) -> dict[str, list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    out: dict[str, list[int]] = {}
    for _ in range(200):
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if not engine.has_unfinished:
            break
    return out


def test_a_burst_sharing_a_prefix_computes_it_once_with_the_same_tokens():
    engine = _engine()
    tokens = _run_burst(engine)
    stats = engine.stats
    # the shared 128 tokens once, then each request's own block
    assert stats.prefill_computed_tokens == 128 + 3 * 16
    assert stats.prefix_cache_hit_tokens == 2 * 128
    # same greedy tokens as each prompt alone on a fresh engine
    for i, p in enumerate(PROMPTS):
        alone = _engine(prefix_caching=False)
        assert alone.generate([p], GREEDY)[0] == tokens[f"r{i}"]


def test_without_prefix_caching_nobody_waits():
    engine = _engine(prefix_caching=False)
    _run_burst(engine)
    assert engine.stats.prefill_computed_tokens == 3 * 144
