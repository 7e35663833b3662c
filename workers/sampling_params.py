"""Per-request sampling parameters, validated when built.

Torch-free: they cross processes (router -> prefill worker -> decode worker) with
the request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)  # presence / frequency, OpenAI's
REPETITION_RANGE = (0.01, 2.0)  # repetition_penalty in [0.01, 2]; 1 = off (a tinier one divides logits to inf)
BIAS_RANGE = (-100.0, 100.0)  # logit_bias values, OpenAI's


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy (argmax), a tested contract
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None  # same seed, same prompt -> same output
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k
    # Penalties (see workers/logits_processors.py for the exact formulas): presence and
    # frequency count the *output* tokens so far (the prefill worker's first token
    # included); repetition_penalty looks at prompt and output tokens, as transformers'.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (token id, bias) added to the logit
    # Structured output: the JSON schema (JSON text) every completion must follow;
    # '{"type": "object"}' for any JSON object. None: free text.
    json_schema: str | None = None
    # Logprobs of the prompt's own tokens (echo): None: none; k >= 0: each prompt
    # token's logprob and the top k at its position (the first token has none).
    prompt_logprobs: int | None = None
    # Not sampling, but it travels with the request the same way: the prefix-cache
    # namespace its block hashes are chained under (cluster.block_hash.cache_namespace:
    # from the request's cache_salt or its API key). None: the shared default.
    cache_namespace: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {getattr(self, name)}")
        lo, hi = REPETITION_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise ValueError(f"repetition_penalty must be in [{lo}, {hi}], got {self.repetition_penalty}")
        bias = tuple((int(t), float(b)) for t, b in (self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias))
        lo, hi = BIAS_RANGE
        for t, b in bias:
            if t < 0 or not lo <= b <= hi:
                raise ValueError(f"logit_bias entries must be token id >= 0 -> bias in [{lo}, {hi}], got {t}: {b}")
        object.__setattr__(self, "logit_bias", bias)
        if self.json_schema is not None and not isinstance(json.loads(self.json_schema), dict):
            raise ValueError("json_schema must be the JSON text of an object")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
