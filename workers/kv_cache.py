"""The paged KV cache tensors.

One tensor per layer, shaped ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``
(K at index 0, V at 1): flashinfer's NHD paged layout. All layers are views into one
allocation ``[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]``, so one
block of one layer (``cache[layer][block]``) is a contiguous ``2 * block_size *
num_kv_heads * head_dim`` run of elements, ready to ship as one buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        # [L, num_blocks, 2, block_size, Hkv, D]
        self.storage = torch.zeros(
            (spec.num_layers, num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_dim),
            dtype=spec.dtype,
            device=device,
        )

    def layer(self, i: int) -> torch.Tensor:
        """[num_blocks, 2, block_size, Hkv, D] view of layer ``i``."""
        return self.storage[i]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
