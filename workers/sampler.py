"""Turn logits into tokens: penalties and logit bias (workers/logits_processors.py),
the structured-output mask (workers/grammar.py), min_tokens, then greedy or
temperature / top-k / top-p with per-request seeds; and logprobs of the sampled token
(plus optional top-k alternatives).

Logprobs are the model's own distribution (log-softmax of the raw logits), before
penalties, bias, masks, temperature or truncation, as vLLM reports them by default."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.grammar import Grammars
from workers.logits_processors import apply_penalties, needs_processing
from workers.request import Request, TokenLogprobs


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits with everything outside top-k / nucleus top-p at -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked before it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int = 0, grammars: Grammars | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self._seeds = torch.Generator().manual_seed(seed)
        self.grammars = grammars

    def generator_for(self, req: Request) -> torch.Generator:
        """A request's own RNG: seeded by the request, else drawn from the engine's."""
        seed = req.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        """logits [N, V] float32 (on any device), one row per request."""
        logits = logits.float().cpu()
        want_lp = any(r.params.logprobs is not None for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        structured = any(r.params.json_schema is not None for r in requests)
        if structured and self.grammars is None:
            raise ValueError("this engine has no grammar support (no tokenizer): json_schema requests are refused")
        if structured or needs_processing(requests):
            logits = logits.clone()  # [N, V]: the raw rows stay what the logprobs report
            apply_penalties(logits, requests)
            if structured:
                self.grammars.apply_masks(logits, requests)
        out = []
        for i, req in enumerate(requests):
            p = req.params
            row = logits[i]
            banned = self._banned(req)
            if banned:
                row = row.clone()
                row[banned] = float("-inf")
            if p.greedy:
                tok = int(torch.argmax(row))
            else:
                row = _truncate(row / p.temperature, p.top_k, p.top_p)
                if req.generator is None:
                    req.generator = self.generator_for(req)
                tok = int(torch.multinomial(row.softmax(-1), 1, generator=req.generator))
            lp = None
            if p.logprobs is not None:
                top = ()
                if p.logprobs > 0:
                    vals, ids = torch.topk(logprobs[i], p.logprobs)
                    top = tuple(zip(ids.tolist(), vals.tolist()))
                lp = TokenLogprobs(tok, float(logprobs[i, tok]), top)
            out.append(SampledToken(tok, lp))
        return out

    def _banned(self, req: Request) -> list[int]:
        """Tokens that would end the request before min_tokens."""
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
