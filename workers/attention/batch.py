"""Backend-neutral description of one step's attention work, and the backend protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.kv_cache import KVCache
from workers.model.llama import AttentionPlan


@dataclass(frozen=True)
class AttentionBatch:
    """B sequences, their new tokens laid end to end (T tokens in all).

    Sequence b's new tokens are ``[query_start_loc[b], query_start_loc[b+1])`` and sit
    at the end of its context of ``seq_lens[b]`` tokens (cached prefix + new), whose
    KV lives in blocks ``block_tables[b]``::

        context of b:  [ cached ...........| new (queries) ]
                        0            seq_len - q_len     seq_len
    """

    query_start_loc: list[int]  # [B + 1]
    seq_lens: list[int]  # [B]
    block_tables: list[list[int]]  # B lists of block ids covering seq_lens[b]
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset of each new token
    block_size: int
    # Per sequence: None, or per layer the slot range [lo, hi) hidden from attention
    # (the padding of a compacted cache whose layers keep different counts; see
    # workers.request.CompactedKV). None for the whole batch when no sequence has any.
    hidden_slots: list[list[tuple[int, int]] | None] | None = None
    # Per sequence: the request id, so a backend may keep state for a sequence across
    # steps (the ``cpu`` backend's decode contexts). None when the caller has no ids.
    seq_ids: list[str] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, b: int) -> int:
        return self.query_start_loc[b + 1] - self.query_start_loc[b]


class AttentionBackend(Protocol):
    name: str

    def plan(self, batch: AttentionBatch, kv_cache: KVCache, num_heads: int) -> AttentionPlan:
        """Host-side work for the whole step (index tensors, kernel plans)."""
        ...

    def release(self) -> None:
        """Drop state kept across steps (the engine has no request left)."""
        ...
