"""One request's state inside an engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cluster.block_hash import BlockHash, hash_blocks
from workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass
class Request:
    """Tokens are ``prompt + output``; KV exists for the first ``num_computed_tokens``.

    ``[ prompt ............ | output ...... ]``
    ``[ computed (in KV) ........ | to compute ]``  -> a step computes a chunk of the
    rest; when it reaches the end, a token is sampled and appended.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_size: int
    extra_keys: tuple[str, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 = not yet
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.block_hashes = hash_blocks(self.token_ids, self.block_size, self.extra_keys)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:  # a block just filled: extend the chain
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes += hash_blocks(self.token_ids[-self.block_size :], self.block_size, self.extra_keys, parent)
