"""Penalties and logit bias in the batched sampler, against a per-element reference
written from the formulas (OpenAI's presence / frequency, transformers' repetition)."""

from __future__ import annotations

import torch

from workers.grammar import unpack_bitmask
from workers.logits_processors import apply_penalties
from workers.request import Request
from workers.sampler import Sampler
from workers.sampling_params import SamplingParams

V = 50


def _request(prompt, output, **params) -> Request:
    r = Request(f"r{len(prompt)}-{len(output)}", list(prompt), SamplingParams(max_tokens=64, **params), block_size=16)
    for t in output:
        r.append_token(t)
    return r


def _reference(row: torch.Tensor, req: Request) -> torch.Tensor:
    p = req.params
    x = row.clone()
    out = req.output_token_ids
    for t in range(V):
        c = out.count(t)
        if p.repetition_penalty != 1.0 and (c > 0 or t in req.prompt_token_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (1.0 if c > 0 else 0.0)
    for t, b in p.logit_bias:
        x[t] += b
    return x


def test_penalties_and_bias_match_the_reference_row_by_row():
    g = torch.Generator().manual_seed(0)
    reqs = [
        _request([1, 2, 3], [4, 4, 5], presence_penalty=0.7),
        _request([1, 2, 3], [4, 4, 5, 4], frequency_penalty=1.5),
        _request([7, 8, 9, 9], [8, 10, 10], repetition_penalty=1.8),
        _request([7, 8], [], repetition_penalty=0.6, presence_penalty=-1.0),  # first token: prompt only
        _request([1], [2, 3], logit_bias=((0, 100.0), (3, -100.0), (49, 2.5))),
        _request([5, 6], [6, 6, 6, 11], presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.2,
                 logit_bias=((6, 3.0),)),
        _request([1, 2], [3]),  # nothing asked: untouched
    ]
    logits = torch.randn(len(reqs), V, generator=g) * 4
    want = torch.stack([_reference(logits[i], r) for i, r in enumerate(reqs)])
    got = logits.clone()
    apply_penalties(got, reqs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got[-1], logits[-1])


def test_greedy_sampling_follows_the_processed_logits_and_reports_raw_logprobs():
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0
    logits[:, 9] = 4.0
    reqs = [_request([1], [7, 7], temperature=0.0, frequency_penalty=1.0, logprobs=0),
            _request([1], [], temperature=0.0, logit_bias=((9, 1.5),), logprobs=0)]
    out = Sampler(eos_token_ids=(0,)).sample(logits.clone(), reqs)
    assert [o.token_id for o in out] == [9, 9]  # 5 - 2 < 4; 4 + 1.5 > 5
    raw = torch.log_softmax(logits, -1)
    assert abs(out[0].logprobs.logprob - float(raw[0, 9])) < 1e-6  # the model's own distribution


def test_penalty_state_is_the_token_list_so_a_handoff_carries_it():
    """A decode worker's request has the prefill worker's first token appended: the
    counts it sees are the same as on one worker."""
    one_worker = _request([3, 4], [12], frequency_penalty=1.0, presence_penalty=0.5)
    handed_off = Request("d", [3, 4], one_worker.params, block_size=16)
    handed_off.append_token(12)  # admit_prefilled appends the first token
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    a, b = logits[:1].clone(), logits[:1].clone()
    apply_penalties(a, [one_worker])
    apply_penalties(b, [handed_off])
    assert torch.equal(a, b) and float(a[0, 12]) == float(logits[0, 12]) - 1.5


def test_unpack_bitmask_matches_shifts():
    bm = torch.randint(-(2**31), 2**31 - 1, (3, 7), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    ref = ((bm.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(3, -1)
    assert torch.equal(unpack_bitmask(bm, 7 * 32), ref)
    assert torch.equal(unpack_bitmask(bm, 200), ref[:, :200])
    wide = unpack_bitmask(bm, 230)
    assert torch.equal(wide[:, :224], ref) and not wide[:, 224:].any()


def test_sampling_params_ranges():
    import pytest

    for bad in ({"presence_penalty": 2.1}, {"frequency_penalty": -3}, {"repetition_penalty": 0.0},
                {"repetition_penalty": 2.5}, {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((-1, 1.0),)},
                {"prompt_logprobs": 21}, {"json_schema": "[1]"}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(logit_bias={"5": 2}).logit_bias == ((5, 2.0),)
