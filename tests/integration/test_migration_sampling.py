"""What a migrated request carries (cluster/retry.py's MIGRATE): prompt + the tokens
already sent become the new prompt, max_tokens shrinks, and a seeded request's RNG
state (bytes, from the last output) continues on the new engine: the continuation is
the undisturbed run's, token for token. On the real SmolLM2."""

from __future__ import annotations

import dataclasses

import pytest

from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def _stream(engine, rid, prompt, params, rng_state=None):
    engine.add_request(rid, prompt, params, rng_state)
    outs = []
    while rid in engine.requests:
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
], ids=["seeded", "greedy"])
def test_continuation_on_another_engine_equals_the_undisturbed_run(make_engine, tokenizer, params):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Invent a name for a lighthouse."}])
    whole = _stream(make_engine(), "whole", prompt, params)
    tokens = [t for o in whole for t in o.new_token_ids]
    assert len(tokens) == 24
    k = 9  # the first engine "dies" after sending k tokens
    carried = whole[k - 1].rng_state
    assert (carried is not None) == (params.seed is not None)  # only seeded sampling carries its RNG
    rest = dataclasses.replace(params, max_tokens=params.max_tokens - k)
    cont = _stream(make_engine(), "migrated", prompt + tokens[:k], rest, carried)
    assert tokens[:k] + [t for o in cont for t in o.new_token_ids] == tokens
    assert cont[-1].finish_reason == whole[-1].finish_reason
