"""One request's state inside an engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.block_hash import BlockHash, BlockHasher
from cluster.worker_api import TokenLogprobs
from workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks reserved, KV coming from a prefill worker
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


def rng_state_bytes(gen: torch.Generator | None) -> bytes | None:
    """A sampling RNG as bytes (what crosses processes: the router never loads torch)."""
    return None if gen is None else gen.get_state().numpy().tobytes()


def generator_from_state(state: bytes) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return gen


@dataclass(frozen=True)
class CompactedKV:
    """A request whose prompt KV arrived compressed (a sparse selection, quantized, or
    both). Its logical length (positions: what RoPE, ``max_tokens`` and the context
    limit see) and its KV length (slots in its block table) then differ::

        positions  0 ........ start ............................ P | P+1 ...
                   [ held exact ][ prompt suffix: S tokens         ][ new ...
        KV slots   0 ........ start ........ start+N               | then new tokens
                   [ held exact ][ layer l keeps kept[l] | hidden  ][ new ...

    Slots ``[start + kept[l], start + N)`` of layer ``l`` are padding (``N = max(kept)``),
    hidden from attention. Keys are cached after RoPE, so kept entries need no
    re-rotation; new tokens continue at their true positions, in slot ``p - num_dropped``.
    Compacted (and quantized) blocks are private: never cached under token hashes."""

    start: int  # first compacted slot (= first logical token of the shipped suffix)
    num_slots: int  # N
    kept: tuple[int, ...]  # per layer, <= N
    num_dropped: int  # logical prompt tokens without a slot: S - N

    def hidden(self, layer: int) -> tuple[int, int]:
        """The padding slot range ``[lo, hi)`` of one layer (empty when lo == hi)."""
        return self.start + self.kept[layer], self.start + self.num_slots

    @property
    def has_hidden(self) -> bool:
        return any(k < self.num_slots for k in self.kept)


@dataclass
class Request:
    """Tokens are ``prompt + output``; KV exists for the first ``num_computed_tokens``.

    ``[ prompt ............ | output ...... ]``
    ``[ computed (in KV) ........ | to compute ]``  -> a step computes a chunk of the
    rest; when it reaches the end, a token is sampled and appended.

    ``num_computed_tokens`` counts positions; ``num_kv_tokens`` counts KV slots. They
    are equal unless the prompt's KV was compacted (``compacted``, see CompactedKV).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    block_size: int
    # The deployment's block hash (its secret seed); None: the public test seed.
    hasher: BlockHasher | None = field(default=None, repr=False)
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 = not yet
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    root_hash: BlockHash = field(init=False)  # the parent of its first block: its namespace's chain root
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    compacted: CompactedKV | None = None
    # Prompt tokens recomputed even on a full prefix-cache hit (at least the last one,
    # for its logits; a sparse export needs its whole observation window's queries).
    min_uncached_tokens: int = 1
    # KV from slot private_from_block * block_size on is lossy (compressed payload, or
    # computed over one): never registered in the prefix cache. None: all exact.
    private_from_block: int | None = None
    # Structured output: the matcher state (workers/grammar.py), built on first use.
    grammar: Any = None
    # params.prompt_logprobs: per prompt position, the logprob of that prompt token given
    # the ones before it (position 0 has none). Filled while the prompt is computed; the
    # whole prompt is then computed, prefix cache or not.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.hasher is None:
            self.hasher = BlockHasher(self.block_size)
        elif self.hasher.block_size != self.block_size:
            raise ValueError(f"hasher block size {self.hasher.block_size} != request block size {self.block_size}")
        self.root_hash = self.hasher.root(self.namespace)
        self.block_hashes = self.hasher.hash_blocks(self.token_ids, self.namespace)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * self.num_prompt_tokens
            self.min_uncached_tokens = self.num_prompt_tokens

    @property
    def namespace(self) -> str | None:
        """The prefix-cache namespace its block hashes are chained under."""
        return self.params.cache_namespace

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_dropped_tokens(self) -> int:
        return 0 if self.compacted is None else self.compacted.num_dropped

    @property
    def num_kv_tokens(self) -> int:
        """Slots in use in the block table (positions computed minus dropped ones)."""
        return self.num_computed_tokens - self.num_dropped_tokens

    def reset_kv(self) -> None:
        """Forget every KV slot (preemption, failed transfer): recompute at full size."""
        self.block_ids = []
        self.num_computed_tokens = 0
        self.num_cached_blocks = 0
        self.compacted = None
        self.private_from_block = None

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
            self.block_hashes += self.hasher.hash_blocks(self.token_ids[-self.block_size :], self.namespace, parent)
