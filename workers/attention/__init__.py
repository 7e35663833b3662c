"""Attention backends: plan once per batch on the host, run once per layer.

``torch`` is the reference (any device, the oracle); ``cpu`` is the reference with a
cheaper decode (the CPU default); ``flashinfer`` is the CUDA path. Pick one with :func:`get_backend`."""

from __future__ import annotations

import torch

from workers.attention.batch import AttentionBackend, AttentionBatch


def get_backend(name: str, device: torch.device, decode_context_copies: bool = True,
                decode_context_copies_max_seqs: int = 16) -> AttentionBackend:
    if name == "auto":
        if device.type == "cuda":
            name = "flashinfer" if _has_flashinfer() else "torch"
        else:
            name = "cpu"
    if name == "torch":
        from workers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        from workers.attention.cpu_backend import CPUAttentionBackend

        return CPUAttentionBackend(decode_context_copies, decode_context_copies_max_seqs)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        from workers.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(device)
    raise ValueError(f"unknown attention backend {name!r} (choose torch, cpu, flashinfer or auto)")


def _has_flashinfer() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["AttentionBackend", "AttentionBatch", "get_backend"]
