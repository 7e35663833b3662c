"""Repetition penalty and prompt logprobs on the real SmolLM2 engine, against
transformers. (That penalties, bias, the grammar and prompt logprobs survive the
prefill -> decode handoff is tested through a live `kvrelay serve`, disaggregated, in
test_openai_features.py: its greedy outputs must equal one engine's.)"""

from __future__ import annotations

import pytest
import torch

from tests.integration.prompts import long_text
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


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
