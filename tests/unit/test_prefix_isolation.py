"""Prefix-cache isolation inside one engine (issue 12): a cache namespace only hits
what requests of the same namespace computed, and a hash hit on a block holding other
tokens (a forced collision) is a counted miss that never changes the output."""

from __future__ import annotations

import dataclasses

import torch

from cluster.block_hash import BlockHash, BlockHasher
from workers.config import EngineConfig
from workers.engine import Engine
from workers.loader import random_model
from workers.model.config import ModelConfig
from workers.sampling_params import SamplingParams

TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=512, eos_token_ids=(0,))
PROMPT = [(7 * i) % 120 + 1 for i in range(80)]  # 5 blocks of 16
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
SEED = bytes(range(32))
_MODEL = random_model(TINY, torch.float32)


def _engine(prefix_caching: bool = True) -> Engine:
    cfg = EngineConfig(device="cpu", num_kv_blocks=64, enable_prefix_caching=prefix_caching, hash_seed=SEED)
    return Engine(cfg, loaded=_MODEL)


def _run(engine: Engine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    """(greedy tokens, prompt tokens served from the prefix cache)."""
    engine.add_request(rid, prompt, params)
    tokens, cached = [], None
    for _ in range(100):
        for o in engine.step():
            tokens += o.new_token_ids
            cached = o.num_cached_tokens
        if not engine.has_unfinished:
            return tokens, cached
    raise AssertionError(f"{rid} did not finish in 100 steps")


def _ns(namespace: str | None) -> SamplingParams:
    return dataclasses.replace(GREEDY, cache_namespace=namespace)


def test_a_namespace_hits_only_its_own_prefixes():
    engine = _engine()
    alone = _engine(prefix_caching=False).generate([PROMPT], GREEDY)[0]
    first, cached = _run(engine, "a1", PROMPT, _ns("salt:a"))
    assert cached == 0 and first == alone
    # The same tenant: every full block but the last (recomputed for its logits).
    again, cached = _run(engine, "a2", PROMPT, _ns("salt:a"))
    assert cached == 64 and again == alone
    # Another tenant, and the shared default namespace: nothing, same output.
    for rid, ns in (("b", "salt:b"), ("default", None)):
        out, cached = _run(engine, rid, PROMPT, _ns(ns))
        assert cached == 0 and out == alone, rid
    assert engine.block_manager.hash_mismatches == 0  # isolation by hash, not by luck


def test_the_deployment_seed_keys_every_block_hash():
    a, b = _engine(), Engine(EngineConfig(device="cpu", num_kv_blocks=64, hash_seed=b"\x07" * 32), loaded=_MODEL)
    _run(a, "r", PROMPT, GREEDY)
    _run(b, "r", PROMPT, GREEDY)
    stored_a = {h for h, _ in a.block_manager.snapshot().blocks}
    stored_b = {h for h, _ in b.block_manager.snapshot().blocks}
    assert len(stored_a) == len(stored_b) == 5
    assert stored_a.isdisjoint(stored_b)
    assert "hash_seed" not in repr(a.config) and SEED.hex() not in repr(a.config)


class CollidingHasher(BlockHasher):
    """Forces collisions: a block's hash depends on its position only, not its tokens
    (what an attacker who could compute hashes would aim for)."""

    def hash_blocks(self, token_ids, namespace=None, parent: BlockHash | None = None) -> list[BlockHash]:
        h = self.root(namespace) if parent is None else parent
        out = []
        for _ in range(len(token_ids) // self.block_size):
            h = (h * 31 + 1) % 2**64
            out.append(h)
        return out


def test_a_forced_collision_is_not_reused():
    engine = _engine()
    engine.hasher = CollidingHasher(16, SEED)
    other = list(PROMPT)
    other[3 * 16 + 5] = 99  # block 3 differs: same hashes as PROMPT's (forced), other tokens
    _run(engine, "victim", PROMPT, GREEDY)
    out, cached = _run(engine, "attacker", other, GREEDY)
    assert cached == 48  # blocks 0-2 really are equal; block 3's hash hit was refused
    assert engine.block_manager.hash_mismatches == 1
    assert out == _engine(prefix_caching=False).generate([other], GREEDY)[0]
