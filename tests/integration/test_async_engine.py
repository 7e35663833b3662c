"""The asyncio wrapper: concurrent streams, errors, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.integration.prompts import long_text
from workers.async_engine import AsyncEngine
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture
def async_engine(make_engine):
    engine = make_engine(num_kv_blocks=256)
    ae = AsyncEngine(engine)
    yield ae
    ae.shutdown()


async def _collect(ae, rid, prompt, params, **kw):
    toks, last = [], None
    async for out in ae.generate(rid, prompt, params, **kw):
        toks += out.new_token_ids
        last = out
    return toks, last


def test_concurrent_streams_match_sync_engine(async_engine, make_engine, tokenizer):
    prompts = [tokenizer.encode(t) for t in ("Hello there,", "The ocean is", "In 1905, Einstein", long_text(300))]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    expected = make_engine().generate(prompts, params)

    async def main():
        return await asyncio.gather(*(_collect(async_engine, f"r{i}", p, params) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    assert [toks for toks, _ in results] == expected
    assert all(last.finished and last.finish_reason == "length" for _, last in results)


def test_a_lagging_consumer_gets_the_same_tokens_in_fewer_messages(async_engine, tokenizer):
    prompt = tokenizer.encode("Count from one to twenty:")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)

    async def read(pause_s):
        outs = []
        async for out in async_engine.generate(f"lag-{pause_s}", prompt, params):
            outs.append(out)
            await asyncio.sleep(pause_s)  # a slow client: steps pile up meanwhile
        return outs

    prompt_only = asyncio.run(read(0.0))
    lagging = asyncio.run(read(0.3))
    toks = lambda outs: [t for o in outs for t in o.new_token_ids]  # noqa: E731
    assert toks(lagging) == toks(prompt_only) and len(toks(lagging)) == 24
    assert len(lagging) < len(prompt_only)  # merged while the consumer slept
    assert [lp.token_id for o in lagging for lp in o.new_logprobs] == toks(lagging)  # logprobs follow their tokens
    assert [o.num_output_tokens for o in lagging] == list(itertools.accumulate(len(o.new_token_ids) for o in lagging))
    assert lagging[-1].finished and not any(o.finished for o in lagging[:-1])


def test_bad_input_raises_and_engine_keeps_serving(async_engine, tokenizer):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await _collect(async_engine, "bad", [], SamplingParams())
        return await _collect(async_engine, "ok", tokenizer.encode("Good morning"), SamplingParams(max_tokens=4))

    toks, last = asyncio.run(main())
    assert len(toks) == 4 and last.finished


def test_deadline_aborts_and_frees_blocks(async_engine, tokenizer):
    bm = async_engine.engine.block_manager

    async def main():
        with pytest.raises(TimeoutError, match="deadline"):
            await _collect(async_engine, "slow", tokenizer.encode(long_text(400)), SamplingParams(max_tokens=500, ignore_eos=True), timeout_s=0.5)
        await asyncio.sleep(0.2)
        return await async_engine.run_on_engine(lambda: (bm.num_free_blocks, async_engine.engine.has_unfinished))

    free, busy = asyncio.run(main())
    assert free == bm.num_blocks and not busy


def test_consumer_that_stops_listening_aborts_its_request(async_engine, tokenizer):
    bm = async_engine.engine.block_manager

    async def main():
        gen = async_engine.generate("walkaway", tokenizer.encode(long_text(400)), SamplingParams(max_tokens=500, ignore_eos=True))
        seen = 0
        async for _ in gen:
            seen += 1
            if seen == 3:
                break
        await gen.aclose()
        for _ in range(50):
            state = await async_engine.run_on_engine(lambda: (bm.num_free_blocks, async_engine.engine.has_unfinished))
            if state == (bm.num_blocks, False):
                return seen, state
            await asyncio.sleep(0.05)
        return seen, state

    seen, (free, busy) = asyncio.run(main())
    assert seen == 3 and free == bm.num_blocks and not busy


def test_cli_generate_runs_end_to_end():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "What is the capital of France?", "--max-tokens", "12", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "12 generated" in r.stderr or "finish_reason=stop" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "x", "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_tokens" in bad.stderr
