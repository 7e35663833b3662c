"""A decode engine reserves KV for a handed-off request only while its running
sequences keep room to finish (``EngineConfig.decode_reserve_tokens``,
``Scheduler.growth_blocks``): a reservation that would take the blocks a running
sequence needs to grow is refused (CapacityError: the router's admission queue waits)
instead of granted and paid for later by preempting that sequence and recomputing it
in full on the decode worker (measured on 6 x 10-turn chat at 120 blocks per worker:
483-1,364 prompt tokens recomputed per run, bench/results/chat_diagnosis.md).

Real engine, tiny random Llama, exact block counts (block size 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_model_loading import _build_hf, _hf_config, _prompt
from workers.config import EngineConfig
from workers.engine import CapacityError, Engine
from workers.loader import load_model, resolve_model
from workers.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)  # 40 + 40 tokens = 5 blocks at the end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    _build_hf(_hf_config(heads=4, kv_heads=2, layers=2), seed=3, path=path)
    return load_model(resolve_model(str(path)), dtype=torch.float32, device="cpu")


def _engine(loaded, num_blocks: int, reserve_tokens: int) -> Engine:
    return Engine(EngineConfig(num_kv_blocks=num_blocks, block_size=16, max_model_len=512, attention_backend="torch",
                               device="cpu", dtype="float32", enable_prefix_caching=False,
                               decode_reserve_tokens=reserve_tokens), loaded=loaded)


def _running(engine: Engine, vocab: int) -> str:
    """One sequence decoding on the engine: a 40-token prompt (3 blocks), 40 tokens to
    generate (5 blocks at the end); after one step it has 3 blocks and needs 2 more."""
    engine.add_request("a", _prompt(40, vocab, seed=1), PARAMS)
    engine.step()
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.running[0].block_ids) == 3
    return "a"


def _finish(engine: Engine, rid: str) -> list[int]:
    out = []
    while rid in engine.requests:
        out += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return out


def test_reservation_that_would_starve_a_running_sequence_waits_instead(tiny):
    """7 blocks: "a" holds 3 and will need 5. A 40-token reservation (3 blocks, 5 with
    its own output) fits the 4 free blocks but leaves "a" no room to grow: refused.
    "a" then finishes without a preemption, and the reservation is granted."""
    vocab = tiny.config.vocab_size
    engine = _engine(tiny, 7, reserve_tokens=256)
    rid = _running(engine, vocab)
    assert engine.scheduler.growth_blocks(256) == 2  # "a": 43 -> 80 tokens in KV, 3 -> 5 blocks
    with pytest.raises(CapacityError, match="kept for decoding"):
        engine.reserve("b", _prompt(40, vocab, seed=2), PARAMS)
    assert engine.block_manager.num_free_blocks == 4  # a refused reservation takes nothing
    tokens = _finish(engine, rid)
    assert len(tokens) == 39 and engine.stats.preemptions == 0  # 1 sampled in the first step
    res = engine.reserve("b", _prompt(40, vocab, seed=2), PARAMS)
    assert len(res.block_ids) == 3


def test_without_the_reserve_the_same_reservation_preempts_the_running_sequence(tiny):
    """decode_reserve_tokens=0 (prompt-only reservations, the behaviour before): the same
    reservation is granted, and "a" is preempted as soon as it needs its 5th block."""
    vocab = tiny.config.vocab_size
    engine = _engine(tiny, 7, reserve_tokens=0)
    rid = _running(engine, vocab)
    engine.reserve("b", _prompt(40, vocab, seed=2), PARAMS)
    assert engine.block_manager.num_free_blocks == 1
    for _ in range(40):
        engine.step()
        if engine.stats.preemptions:
            break
    assert engine.stats.preemptions == 1 and engine.requests[rid] in engine.scheduler.waiting


def test_reserved_requests_count_their_output_too(tiny):
    """Two reservations in a row with no sequence running yet: the second must leave
    the first room for its whole output (capped), counted in whole blocks."""
    vocab = tiny.config.vocab_size
    engine = _engine(tiny, 10, reserve_tokens=256)
    engine.reserve("b", _prompt(40, vocab, seed=2), PARAMS)  # 3 blocks, +3 kept for its 40 tokens
    assert engine.scheduler.growth_blocks(256) == 3
    assert engine.scheduler.growth_blocks(16) == 1  # the cap bounds what one request keeps
    with pytest.raises(CapacityError):  # 3 + 2 for "c", 3 for "b": 8 > 7 free
        engine.reserve("c", _prompt(40, vocab, seed=3), PARAMS)
    engine2 = _engine(tiny, 11, reserve_tokens=256)
    engine2.reserve("b", _prompt(40, vocab, seed=2), PARAMS)
    engine2.reserve("c", _prompt(40, vocab, seed=3), PARAMS)  # 3 + 2 + 3 = 8 of 8 free


def test_a_lone_request_that_fits_the_pool_is_always_reservable(tiny):
    """The reserve never refuses a request an empty pool can hold to the end (the
    engine's validate() bound): 40 + 40 tokens are 5 blocks, in a 5-block pool."""
    engine = _engine(tiny, 5, reserve_tokens=256)
    res = engine.reserve("b", _prompt(40, tiny.config.vocab_size, seed=2), PARAMS)
    assert len(res.block_ids) == 3


def test_reserve_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="decode_reserve_tokens"):
        EngineConfig(decode_reserve_tokens=-1)
