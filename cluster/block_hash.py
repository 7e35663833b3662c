"""Chained, keyed hashes of full token blocks, shared by the router and every worker.

A block's hash covers its parent's hash, its token ids and any extra keys (model id,
LoRA adapter, ...), so equal hashes mean equal prefixes, not just equal blocks. The
first block's parent is the *root* of the request's cache namespace, so the same
tokens under another namespace (another tenant's ``cache_salt`` or API key) hash to
an unrelated chain::

    tokens  [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes   h0 = H(root(ns), t0..t15, extra)
                       h1 = H(h0, t16..t31, extra)
                                   (partial block: never hashed)

    H = BLAKE2b-64 keyed with the deployment's secret seed (hashlib), over
        parent as 8 little-endian bytes || tokens as little-endian uint32 || extra keys
    root(None) = ROOT_HASH;  root(ns) = H-keyed("ns" 0x00 ns-utf8)

Keyed, because an unkeyed hash with a public seed lets anyone who can send prompts
craft two prefixes with one hash (64 bits: a birthday search of ~2^32 prompts for a
plain xxh3) and have one tenant's cached KV answer another's. With a secret key an
attacker cannot compute hashes offline at all. Workers still confirm every hit
against the cached block's token ids (``workers.block_manager``), so even a chance
64-bit collision never serves wrong KV.

Stable across processes, runs, machines and Python versions for one seed (unlike the
salted built-in ``hash()``). Without a seed (unit tests, simulators) a fixed public
``DEFAULT_SEED`` keys the same function; a deployment always brings its own
(``ClusterConfig.with_hash_seed``), generated at start unless configured.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

BlockHash = int  # unsigned 64-bit

# The root (parent of the first block) of the shared default namespace; part of the
# encoding. Another namespace's root is derived from its name (root_hash).
ROOT_HASH: BlockHash = 0x6B7672656C6179  # "kvrelay"

# Public key for hashing outside a deployment (tests, simulators, tools). Never used by
# a running cluster: ClusterConfig.with_hash_seed() gives each deployment a secret one.
DEFAULT_SEED = b"kvrelay-public-test-seed"
MAX_SEED_BYTES = 64  # BLAKE2b's key size limit
_DIGEST = 8


def _extra_bytes(extra_keys: Sequence[str | int] | None) -> bytes:
    if not extra_keys:
        return b""
    return b"\x1f".join(str(k).encode("utf-8") for k in extra_keys)


def _seed(seed: bytes | None) -> bytes:
    key = DEFAULT_SEED if seed is None else seed
    if not 1 <= len(key) <= MAX_SEED_BYTES:
        raise ValueError(f"the hash seed must be 1 to {MAX_SEED_BYTES} bytes, got {len(key)}")
    return key


def _digest(data: bytes, key: bytes) -> BlockHash:
    return int.from_bytes(hashlib.blake2b(data, digest_size=_DIGEST, key=key).digest(), "little")


def root_hash(namespace: str | None, seed: bytes | None = None) -> BlockHash:
    """The chain root of a cache namespace (``None``: the shared default one)."""
    if namespace is None:
        return ROOT_HASH
    # surrogatepass: a JSON string may carry a lone surrogate ("\ud800"); it is still a
    # distinct, stable namespace rather than an encoding error
    return _digest(b"ns\x00" + namespace.encode("utf-8", "surrogatepass"), _seed(seed))


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[str | int] | None = None,
    *,
    seed: bytes | None = None,
) -> BlockHash:
    """Hash one block given its parent's hash (``None``: the default namespace's root)."""
    data = (ROOT_HASH if parent is None else parent).to_bytes(8, "little")
    data += np.asarray(token_ids, dtype="<u4").tobytes() + _extra_bytes(extra_keys)
    return _digest(data, _seed(seed))


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str | int] | None = None,
    parent: BlockHash | None = None,
    *,
    seed: bytes | None = None,
    namespace: str | None = None,
) -> list[BlockHash]:
    """Chained hashes of every full block of ``token_ids`` (a trailing partial block
    is not hashed). ``parent`` continues an existing chain; otherwise the chain starts
    at ``namespace``'s root."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    key = _seed(seed)
    extra = _extra_bytes(extra_keys)
    prev = root_hash(namespace, key) if parent is None else parent
    n = len(token_ids) // block_size * block_size
    buf = np.asarray(token_ids[:n], dtype="<u4").tobytes()  # one conversion for every block
    step = block_size * 4
    out: list[BlockHash] = []
    for start in range(0, len(buf), step):
        prev = _digest(prev.to_bytes(8, "little") + buf[start : start + step] + extra, key)
        out.append(prev)
    return out


@dataclass(frozen=True)
class BlockHasher:
    """The block hash of one deployment: its secret seed and block size. The router
    and every worker build one from the same configuration."""

    block_size: int
    seed: bytes | None = field(default=None, repr=False)  # None: DEFAULT_SEED (never logged)
    extra_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _seed(self.seed)  # fail at construction on a bad seed

    def hash_blocks(self, token_ids: Sequence[int], namespace: str | None = None,
                    parent: BlockHash | None = None) -> list[BlockHash]:
        return hash_blocks(token_ids, self.block_size, self.extra_keys, parent, seed=self.seed, namespace=namespace)

    def root(self, namespace: str | None) -> BlockHash:
        return root_hash(namespace, self.seed)


def cache_namespace(cache_salt: str | None, api_key: str | None, per_key: bool = True) -> str | None:
    """The prefix-cache namespace of a request: its ``cache_salt`` if it brings one,
    else (``per_key``) one derived from its bearer key, else the shared default
    (``None``). Only a digest of the key crosses to the workers, never the key."""
    if cache_salt is not None:
        return "salt:" + cache_salt
    if per_key and api_key:
        return "key:" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]
    return None
