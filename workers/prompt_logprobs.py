"""Logprobs of a prompt's own tokens (``echo`` with ``logprobs``: lm-eval's
loglikelihood tasks), computed while the prompt is prefilled.

Position p's hidden state predicts token p + 1, so a prefill chunk covering positions
``[start, end)`` yields the logprobs of prompt tokens ``start + 1 .. min(end, P - 1)``
(the first prompt token has none; the last position predicts the first output token,
which the sampler handles).

Memory: a full logits row per prompt token would be P x V floats (4,096 tokens x 49,152
vocab = 768 MiB). Instead the rows go through the LM head ``ROWS`` at a time (one
[ROWS, V] float32 slice, 48 MiB for SmolLM2's vocab), each slice is log-softmaxed and
reduced at once to the chosen token's logprob and the top k, and dropped. What is kept
is P x (k + 1) (id, logprob) pairs. The scheduler's chunk size bounds the hidden rows
of one step as well."""

from __future__ import annotations

from collections.abc import Callable

import torch

from workers.request import Request, TokenLogprobs

ROWS = 256  # logits rows materialized at once


def fill_prompt_logprobs(
    req: Request, start: int, end: int, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """hidden [end - start, H]: the chunk's final hidden states (positions [start, end)).
    Writes ``req.prompt_logprobs[p + 1]`` for every position p < P - 1 in the chunk."""
    last = min(end, req.num_prompt_tokens - 1)  # positions [start, last) predict prompt tokens
    k = req.params.prompt_logprobs or 0
    for s in range(start, last, ROWS):
        e = min(s + ROWS, last)
        logits = compute_logits(hidden[s - start : e - start]).float()  # [e - s, V]
        lp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(req.prompt_token_ids[s + 1 : e + 1], device=lp.device)  # [e - s] int64
        chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).cpu().tolist()
        if k:
            top_v, top_i = (t.cpu().tolist() for t in torch.topk(lp, k, dim=-1))
        for j in range(e - s):
            top = tuple(zip(top_i[j], top_v[j])) if k else ()
            req.prompt_logprobs[s + j + 1] = TokenLogprobs(req.prompt_token_ids[s + j + 1], chosen[j], top)
