"""Chained hashes of full token blocks, shared by the router and every worker.

A block's hash covers its parent's hash, its token ids and any extra keys (model id,
LoRA adapter, ...), so equal hashes mean equal prefixes, not just equal blocks::

    tokens  [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes   h0 = H(ROOT, t0..t15, extra)
                       h1 = H(h0, t16..t31, extra)
                                   (partial block: never hashed)

xxh3-64 over a fixed little-endian byte encoding: stable across processes, runs,
machines and Python versions (unlike the salted built-in ``hash()``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

BlockHash = int  # unsigned 64-bit

# Seed of the first block's chain; a fixed constant, part of the wire contract.
ROOT_HASH: BlockHash = 0x6B7672656C6179  # "kvrelay"


def _extra_bytes(extra_keys: Sequence[str | int] | None) -> bytes:
    if not extra_keys:
        return b""
    return b"\x1f".join(str(k).encode("utf-8") for k in extra_keys)


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[str | int] | None = None,
) -> BlockHash:
    """Hash one block given its parent's hash (``None`` for the first block)."""
    h = xxhash.xxh3_64()
    h.update((ROOT_HASH if parent is None else parent).to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype="<u4").tobytes())
    h.update(_extra_bytes(extra_keys))
    return h.intdigest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str | int] | None = None,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of every full block of ``token_ids`` (a trailing partial block
    is not hashed). ``parent`` continues an existing chain."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra_keys)
        out.append(parent)
    return out
