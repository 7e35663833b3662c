"""Regression: a caller that gives up on an engine call must not kill the engine thread."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from workers.async_engine import AsyncEngine
from workers.config import EngineConfig
from workers.engine import Engine
from workers.loader import random_model
from workers.model.config import ModelConfig
from workers.sampling_params import SamplingParams

TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(0,))


@pytest.fixture
def aengine():
    engine = Engine(EngineConfig(device="cpu", num_kv_blocks=32), loaded=random_model(TINY, torch.float32))
    ae = AsyncEngine(engine)
    yield ae
    ae.shutdown()


def test_cancelled_engine_call_leaves_the_engine_running(aengine):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await aengine.run_on_engine(lambda: time.sleep(0.3) or "late", timeout_s=0.05)
        await asyncio.sleep(0.5)  # the command ran; its result had nobody to go to
        assert aengine.is_alive
        assert await aengine.run_on_engine(lambda: 42) == 42
        toks = []
        async for out in aengine.generate("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)):
            toks += out.new_token_ids
        return toks

    assert len(asyncio.run(main())) == 4


def test_a_failing_command_does_not_stop_the_loop(aengine):
    async def main():
        with pytest.raises(ZeroDivisionError):
            await aengine.run_on_engine(lambda: 1 / 0)
        aengine._submit(lambda: 1 / 0)  # fire-and-forget command that raises
        await asyncio.sleep(0.2)
        return aengine.is_alive, await aengine.run_on_engine(lambda: "ok")

    assert asyncio.run(main()) == (True, "ok")
