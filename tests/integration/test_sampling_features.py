"""Penalties, logit bias, structured output and prompt logprobs on the real SmolLM2:
against transformers (greedy with repetition_penalty, prompt logprobs), and through
the disaggregated handoff (in-process cluster: the prefill worker samples the first
token, the decode worker continues; the output must equal one engine's)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from cluster.cluster import KVRelayCluster
from tests.integration.prompts import long_text
from tests.integration.test_disaggregation import Running, _config
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
                   "capital": {"type": "boolean"}},
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(smollm2):
    from workers.config import EngineConfig
    from workers.engine import Engine

    return Engine(EngineConfig(num_kv_blocks=512, chunk_size=128, max_num_batched_tokens=256), loaded=smollm2)


def _run(engine, prompt, params):
    """(output token ids, the first output's prompt_logprobs)."""
    rid = f"t-{id(params)}-{len(prompt)}"
    engine.add_request(rid, prompt, params)
    toks, plp = [], None
    while rid in engine.requests:
        for out in engine.step():
            if out.request_id == rid:
                toks += out.new_token_ids
                plp = plp if out.prompt_logprobs is None else out.prompt_logprobs
    return toks, plp


def test_greedy_with_repetition_penalty_equals_transformers(engine, hf_model, tokenizer):
    prompts = [tokenizer.encode("The list goes: one, two, one, two, one, two, one,"),
               tokenizer.apply_chat_template([{"role": "user", "content": "Repeat after me: la la la la la"}])]
    for ids in prompts:
        ours, _ = _run(engine, ids, SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.3))
        plain, _ = _run(engine, ids, SamplingParams(max_tokens=24, temperature=0.0))
        with torch.no_grad():
            hf = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3,
                                   pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert ours == hf, (tokenizer.decode(ours), tokenizer.decode(hf))
        assert ours != plain  # the penalty changed the output


def test_prompt_logprobs_equal_transformers_across_chunks_and_cache_hits(engine, hf_model, tokenizer):
    ids = tokenizer.encode("Notes: " + long_text(300))[:300]  # 3 chunks of 128, 2 logits slices of 256
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3)
    _, plp = _run(engine, ids, params)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)  # [P, V]
    assert plp[0] is None and len(plp) == len(ids)
    got = torch.tensor([e.logprob for e in plp[1:]])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    for p, e in enumerate(plp[1:]):
        assert e.token_id == ids[p + 1] and len(e.top) == 3
        assert abs(e.top[0][1] - float(ref[p].max())) < 2e-3
    # again: the prompt is in the prefix cache now, yet every prompt token gets its logprob
    _, again = _run(engine, ids, params)
    assert [round(e.logprob, 4) for e in again[1:]] == [round(e.logprob, 4) for e in plp[1:]]


@pytest.fixture(scope="module")
def inproc(engine):
    c = Running(KVRelayCluster(_config(transfer={"transport": "inprocess"}), use_ray=False))
    yield c
    c.close()


def _cluster_run(c: Running, prompt, params):
    async def go():
        toks, plp = [], None
        async for out in c.cluster.generate(prompt, params):
            toks += out.new_token_ids
            plp = plp if out.prompt_logprobs is None else out.prompt_logprobs
        return toks, plp

    return c.run(go(), timeout=300)


def test_handoff_carries_penalty_grammar_and_prompt_logprob_state(inproc, engine, tokenizer):
    """The first token comes from the prefill worker, the rest from the decode worker:
    penalties count that token, the grammar matcher is rebuilt and advanced by it, and
    the prompt logprobs come back with it. Greedy output equals one engine's."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Describe Paris as JSON with city, population, capital."}])
    cases = [
        (tokenizer.encode("The list goes: one, two, one, two, one, two, one,"),
         SamplingParams(max_tokens=20, temperature=0.0, frequency_penalty=1.2, presence_penalty=0.4, repetition_penalty=1.1,
                        logit_bias=((tokenizer.encode(" two")[0], -5.0),))),
        (chat, SamplingParams(max_tokens=80, temperature=0.0, json_schema=json.dumps(SCHEMA))),
        (tokenizer.encode("Paris is the capital of France."), SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2)),
    ]
    for prompt, params in cases:
        want, want_plp = _run(engine, prompt, params)
        got, got_plp = _cluster_run(inproc, prompt, params)
        assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
        if params.json_schema:
            jsonschema.validate(json.loads(tokenizer.decode(got, skip_special_tokens=True)), SCHEMA)
        if params.prompt_logprobs is not None:
            assert got_plp[0] is None and len(got_plp) == len(prompt)
            assert [round(e.logprob, 3) for e in got_plp[1:]] == [round(e.logprob, 3) for e in want_plp[1:]]
    stats = inproc.run(inproc.cluster.worker_stats())
    decode = next(s for s in stats if s["role"] == "decode")
    assert decode["kv_recomputes"] == 0 and decode["generation_tokens"] > 0  # the decode worker really continued
