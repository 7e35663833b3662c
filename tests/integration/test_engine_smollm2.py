"""The engine on the real SmolLM2-135M-Instruct, against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

from tests.integration.prompts import long_text, mixed_prompts
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
GEN = 64


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return mixed_prompts(tokenizer)


@pytest.fixture(scope="module")
def greedy_run(smollm2, prompts):
    """All prompts at once, as one continuous batch, 64 greedy tokens each; the raw
    logits of every sampled row are captured through the runner's hook."""
    from workers.config import EngineConfig
    from workers.engine import Engine

    engine = Engine(EngineConfig(num_kv_blocks=1024), loaded=smollm2)
    logits: dict[str, list[torch.Tensor]] = {}
    engine.runner.logits_hook = lambda ids, lg: [logits.setdefault(r, []).append(lg[i].clone()) for i, r in enumerate(ids)]
    ids = [f"p{i}" for i in range(len(prompts))]
    # min_tokens == max_tokens: EOS is banned, exactly like HF's min_new_tokens
    params = SamplingParams(max_tokens=GEN, min_tokens=GEN, temperature=0.0)
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    outs: dict[str, list[int]] = {r: [] for r in ids}
    max_running = 0
    while engine.has_unfinished:
        max_running = max(max_running, len(engine.scheduler.running) + len(engine.scheduler.waiting))
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    return [outs[r] for r in ids], [logits[r] for r in ids], max_running


def test_prompts_span_short_to_long(prompts):
    lens = [len(p) for p in prompts]
    assert len(prompts) >= 8 and min(lens) <= 10 and max(lens) >= 1000


def test_greedy_matches_transformers_generate(greedy_run, prompts, hf_model):
    outputs, _, max_running = greedy_run
    assert max_running == len(prompts)  # all were in flight together
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        ref = hf_model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=GEN,
            min_new_tokens=GEN,
            do_sample=False,
        )[0, len(p) :].tolist()
        assert out == ref, f"prompt {i} ({len(p)} tokens) diverges at {next(j for j, (a, b) in enumerate(zip(out, ref)) if a != b)}"


def test_logits_match_transformers(greedy_run, prompts, hf_model):
    outputs, logits, _ = greedy_run
    for i in (0, 1, 5, 7):
        p, out = prompts[i], outputs[i]
        with torch.no_grad():
            ref = hf_model(torch.tensor([p + out[:4]])).logits[0].float()  # [len, V]
        for step in range(4):  # prefill's last position, then 3 decode steps
            ours = logits[i][step]
            diff = (ours - ref[len(p) - 1 + step]).abs().max().item()
            assert diff < 1e-3, f"prompt {i} step {step}: max abs logit diff {diff}"


def _run(engine, prompts, params):
    return engine.generate(prompts, params)


def test_prefix_reuse_computes_only_new_tokens(make_engine, tokenizer):
    system = "You are a careful assistant. Use this reference:\n" + long_text(2400)
    questions = ["Who is this for?", "What is the main idea?", "Name one risk.", "Summarize in 5 words."]
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    bs = 16

    cold = make_engine(enable_prefix_caching=False)
    expected = _run(cold, prompts, params)
    assert cold.stats.prefill_computed_tokens == sum(len(p) for p in prompts)

    engine = make_engine()
    first = _run(engine, prompts[:1], params)
    assert engine.stats.prefill_computed_tokens == len(prompts[0])
    # The rest share a long prefix with the first: only their own tail is computed.
    shared = min(len(p) for p in prompts)
    while any(p[:shared] != prompts[0][:shared] for p in prompts):
        shared -= 1
    assert shared > 400
    before = engine.stats.prefill_computed_tokens
    rest = _run(engine, prompts[1:], params)
    cached = (shared // bs) * bs
    assert engine.stats.prefill_computed_tokens - before == sum(len(p) - cached for p in prompts[1:])
    assert engine.stats.prefix_cache_hit_tokens == cached * 3
    assert first + rest == expected

    # Resubmitting the very same prompts recomputes only the last partial block.
    before = engine.stats.prefill_computed_tokens
    again = _run(engine, prompts, params)
    assert engine.stats.prefill_computed_tokens - before == sum(len(p) - ((len(p) - 1) // bs) * bs for p in prompts)
    assert again == expected


def test_chunked_prefill_matches_whole_prompt(make_engine, prompts):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    whole = make_engine(chunk_size=2048, max_num_batched_tokens=2048, enable_prefix_caching=False)
    chunked = make_engine(chunk_size=32, max_num_batched_tokens=256, enable_prefix_caching=False)
    steps_before = chunked.stats.steps
    out_whole = _run(whole, prompts, params)
    out_chunked = _run(chunked, prompts, params)
    assert out_chunked == out_whole
    # the 1000-token prompt really ran in 32-token chunks
    assert chunked.stats.steps - steps_before >= max(len(p) for p in prompts) // 32


def test_preemption_completes_every_request_identically(make_engine, tokenizer):
    prompts = [tokenizer.encode(f"Request {i}: " + long_text(200 + 37 * i)) for i in range(16)]
    params = SamplingParams(max_tokens=48, min_tokens=48, temperature=0.0)
    roomy = make_engine()
    expected = _run(roomy, prompts, params)
    assert roomy.stats.preemptions == 0
    # Each request needs ~6-10 blocks by its end; 40 blocks cannot hold 16 at once.
    tight = make_engine(num_kv_blocks=40)
    got = _run(tight, prompts, params)
    assert tight.stats.preemptions > 0
    assert got == expected
    assert all(len(o) == 48 for o in got)
    assert tight.block_manager.num_free_blocks == 40  # everything released


def test_seed_reproduces_and_top_k_1_is_greedy(make_engine, tokenizer):
    engine = make_engine()
    p = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a short story about a cat."}])
    other = tokenizer.encode(long_text(500))
    sampled = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = _run(engine, [p], sampled)[0]
    b = _run(engine, [other, p, other], [SamplingParams(max_tokens=8, temperature=1.0), sampled, SamplingParams(max_tokens=20)])[1]
    c = _run(engine, [p], SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=50, seed=99))[0]
    assert a == b  # same seed, same output, whatever else shares the batch
    assert a != c
    greedy = _run(engine, [p], SamplingParams(max_tokens=32, temperature=0.0))[0]
    topk1 = _run(engine, [p], SamplingParams(max_tokens=32, temperature=0.8, top_k=1, seed=5))[0]
    assert topk1 == greedy


def test_stop_token_ids_min_tokens_and_logprobs(make_engine, tokenizer):
    engine = make_engine()
    p = tokenizer.encode("Count: one, two, three, four, five, six,")
    base = _run(engine, [p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    stop_at = 5
    stop_id = base[stop_at]
    first_hit = base.index(stop_id)
    engine.add_request("s", p, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop_id,), logprobs=3))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == base[: first_hit + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert len(lps) == first_hit + 1
    for lp in lps:  # greedy: the sampled token is the most likely one
        assert lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0
    # min_tokens bans the stop id until enough tokens exist
    out = _run(engine, [p], SamplingParams(max_tokens=20, min_tokens=first_hit + 3, temperature=0.0, stop_token_ids=(stop_id,)))[0]
    assert len(out) > first_hit + 1
    # max_tokens ends with reason "length"
    engine.add_request("len", p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    last = None
    while engine.has_unfinished:
        for o in engine.step():
            last = o
    assert last.finish_reason == "length" and last.num_output_tokens == 3


def test_bad_input_is_refused_and_engine_keeps_running(make_engine, tokenizer):
    engine = make_engine(max_model_len=2048)
    good = tokenizer.encode("Once upon a time")
    engine.add_request("good", good, SamplingParams(max_tokens=8, temperature=0.0))
    out = [t for o in engine.step() for t in o.new_token_ids]  # in flight while bad input arrives
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="2048"):
        engine.add_request("long", [1] * 2100, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match=r"2040 tokens\) plus max_tokens \(16\)"):
        engine.add_request("long2", [1] * 2040, SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("vocab", good + [10**6], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("neg", [-1], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", good, SamplingParams())
    for bad in ({"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"min_tokens": 99, "max_tokens": 4}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    # the good request is unaffected
    while engine.has_unfinished:
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert len(out) == 8
    assert engine.abort("good") is False  # already finished


def test_abort_frees_blocks(make_engine, tokenizer):
    engine = make_engine(num_kv_blocks=64)
    engine.add_request("a", tokenizer.encode(long_text(600)), SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    assert engine.abort("a") is True
    assert engine.block_manager.num_free_blocks == 64
    assert not engine.has_unfinished
