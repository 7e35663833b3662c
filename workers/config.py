"""Engine configuration, validated when built (fail at the edge, in plain words)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported only when a dtype or device is resolved (in a worker): the router
# builds this config without loading torch.
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # "default" (embedded SmolLM2), a .gguf file or a HF directory
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0  # KV pool size, unless num_kv_blocks is set
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64  # running batch cap
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill + decode)
    chunk_size: int = 512  # most prompt tokens one request computes in one step
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # A decode engine reserves a handed-off request only while its free KV also covers
    # the output still to come of it and of every request it holds, each counted up to
    # this many tokens (Scheduler.growth_blocks), so that decoding never preempts a
    # running sequence; 0: room for the prompt alone (running sequences may be preempted
    # and recomputed in full when they grow).
    decode_reserve_tokens: int = 256
    attention_backend: str = "auto"  # auto (cpu on CPU, flashinfer on CUDA) | torch | cpu | flashinfer
    # True: the cpu attention backend keeps running decode contexts as contiguous copies
    # (at most the KV pool's size again) instead of gathering them from the paged cache
    # each step; served side by side 1.02-1.59x output tok/s at concurrency 8 and on
    # prefix_repetition (bench/results/peer.md). False: gather.
    decode_context_copies: bool = True
    # ... for decode batches of at most this many sequences; larger ones gather. Served at
    # concurrency 32 the copies were slower (TPOT p50 410 vs 336 ms, and a 5 s stall as
    # 30 sequences joined at once); at 8 and on prefix_repetition faster (peer.md).
    decode_context_copies_max_seqs: int = 16
    linear_kernel: str = "auto"  # auto (onednn on CPU, torch elsewhere) | torch | onednn (workers/model/packed_linear.py)
    num_threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    seed: int = 0  # seeds the sampling of requests that bring no seed of their own
    # The deployment's secret key of the block hashes (cluster/block_hash.py); None: the
    # public test seed. Secret: not in repr, so never in a log line.
    hash_seed: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.num_kv_blocks is None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if self.decode_context_copies_max_seqs < 1:
            raise ValueError(f"decode_context_copies_max_seqs must be >= 1, got {self.decode_context_copies_max_seqs}")
        if self.decode_reserve_tokens < 0:
            raise ValueError(f"decode_reserve_tokens must be >= 0, got {self.decode_reserve_tokens}")
        for f in ("max_num_seqs", "max_num_batched_tokens", "chunk_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.chunk_size > self.max_num_batched_tokens:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must not exceed max_num_batched_tokens ({self.max_num_batched_tokens})"
            )
        if self.attention_backend not in ("auto", "torch", "cpu", "flashinfer"):
            raise ValueError(f"attention_backend must be auto, torch, cpu or flashinfer, got {self.attention_backend!r}")

    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
