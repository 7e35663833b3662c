"""KV events: how a worker tells the router which blocks it holds.

Every worker numbers its events 1, 2, 3, ...; a consumer applies them in order and
resynchronises from a snapshot after a gap (or when a worker restarts and its
sequence starts again at 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.block_hash import BlockHash


@dataclass(frozen=True)
class BlockStored:
    """``block_hashes`` became resident, in chain order; the first one's parent is
    ``parent_hash`` (``None``: the chain starts at the root)."""

    seq: int
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None


@dataclass(frozen=True)
class BlockRemoved:
    """``block_hashes`` were evicted and can no longer be hit."""

    seq: int
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every cached block is gone (cache reset)."""

    seq: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KVSnapshot:
    """Every resident block as (hash, parent) pairs, valid as of event ``seq``."""

    seq: int
    blocks: tuple[tuple[BlockHash, BlockHash | None], ...] = field(default_factory=tuple)
