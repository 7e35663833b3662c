"""What a request's penalties and logit bias do to its logits row, for a whole batch
at once (the sampler calls this before temperature, top-k/top-p and the argmax).

For a request's row ``x`` (raw logits, float32 [V]), with ``c[t]`` the number of times
token ``t`` appears in the request's *output* so far (on the decode worker that
includes the prefill worker's first token: the handoff carries it) and ``seen[t]``
true when ``t`` is in the prompt or the output:

    1. repetition (transformers' RepetitionPenaltyLogitsProcessor, vLLM's field):
           x[t] = x[t] / r   if seen[t] and x[t] > 0
           x[t] = x[t] * r   if seen[t] and x[t] <= 0
    2. frequency and presence (OpenAI's formula):
           x[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0)
    3. logit bias (OpenAI's): x[t] += bias[t]

The penalty state is the token list itself, recounted each step (one scatter per
row), so it survives preemption, recompute and the prefill -> decode handoff with no
extra state to ship.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.request import Request


def _counts(token_lists: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """[n, V] float32: occurrences of each token id in each list."""
    n = len(token_lists)
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(n, vocab + 1)  # the extra column swallows the padding
    if width:
        ids = torch.full((n, width), vocab, dtype=torch.int64)  # [n, width] padded with V
        for i, toks in enumerate(token_lists):
            if toks:
                ids[i, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.int64).clamp_(0, vocab)
        counts.scatter_add_(1, ids, torch.ones(n, width))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """logits [N, V] float32 on CPU, one row per request; changed in place."""
    rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
    if rows:
        vocab = logits.shape[1]
        reqs = [requests[i] for i in rows]
        idx = torch.tensor(rows)
        x = logits[idx]  # [n, V]
        out_counts = _counts([r.output_token_ids for r in reqs], vocab)
        rep = torch.tensor([r.params.repetition_penalty for r in reqs]).unsqueeze(1)  # [n, 1]
        if bool((rep != 1.0).any()):
            seen = (_counts([r.prompt_token_ids for r in reqs], vocab) + out_counts) > 0
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        freq = torch.tensor([r.params.frequency_penalty for r in reqs]).unsqueeze(1)
        pres = torch.tensor([r.params.presence_penalty for r in reqs]).unsqueeze(1)
        x = x - freq * out_counts - pres * (out_counts > 0).float()
        logits[idx] = x
    apply_logit_bias(logits, requests)


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Add every request's bias to its row, in one indexed add."""
    r_idx, t_idx, vals = [], [], []
    for i, r in enumerate(requests):
        for t, b in r.params.logit_bias:
            r_idx.append(i)
            t_idx.append(t)
            vals.append(b)
    if vals:
        logits.index_put_((torch.tensor(r_idx), torch.tensor(t_idx)), torch.tensor(vals, dtype=logits.dtype), accumulate=True)


def needs_processing(requests: Sequence[Request]) -> bool:
    return any(r.params.has_penalties or r.params.logit_bias for r in requests)
