"""What a KV page looks like, and the handshake that refuses a mismatched peer.

Two workers can exchange pages only if they agree on the model, dtype, layer count,
KV heads, head size and block size, and speak the same wire version. The check names
every field that differs, so an operator sees "dtype: float32 vs bfloat16", not a
shape error deep inside a copy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import xxhash

from cluster.compression import CODEC_VERSION

# Version of the handoff wire format (descriptor, header, tags, ack). Bump on change.
# 2: the descriptor carries a PayloadPlan; compressed layers travel framed (kv_codec).
WIRE_VERSION = 2


# Bytes per element of the KV cache dtypes (torch's names); kept here so the layout is
# torch-free (the router replica reads it).
_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "float64": 8}


class LayoutMismatchError(ValueError):
    """A peer's KV layout or wire version differs from ours."""


@dataclass(frozen=True)
class KVLayout:
    model_id: str
    dtype: str  # torch dtype name, e.g. "float32"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    wire_version: int = WIRE_VERSION
    codec_version: int = CODEC_VERSION

    @property
    def element_size(self) -> int:
        try:
            return _ELEMENT_SIZE[self.dtype]
        except KeyError:
            raise LayoutMismatchError(f"unknown KV dtype {self.dtype!r}") from None

    @property
    def bytes_per_block_per_layer(self) -> int:
        """K and V of one block of one layer: ``[2, block_size, Hkv, D]``."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    def digest(self) -> int:
        """Stable 64-bit fingerprint (travels in every transfer header)."""
        return xxhash.xxh3_64(repr(sorted(asdict(self).items())).encode()).intdigest()

    def differences(self, other: "KVLayout") -> list[str]:
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def check_peer(self, peer: "KVLayout", peer_role: str = "peer") -> None:
        """Raise LayoutMismatchError naming what differs (ours vs the peer's)."""
        diff = self.differences(peer)
        if diff:
            raise LayoutMismatchError(
                f"refusing KV handoff with {peer_role}: layout differs (ours vs theirs): " + "; ".join(diff)
            )
