"""Rotary position embeddings (rotate-half / NeoX layout, as in HF Llama).

cos/sin are precomputed once for every position up to ``max_position`` and looked
up by position id, so a batch may mix sequences at any positions.
"""

from __future__ import annotations

import math

import torch

from workers.model.config import RopeScaling


def _yarn_inv_freq(base: float, dim: int, s: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = s.original_max_position_embeddings or max_pos
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (s.factor * pos_freqs)

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp
    inv_freq = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    mscale = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    )
    return inv_freq, mscale


def inverse_frequencies(base: float, dim: int, scaling: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    """[dim // 2] float32 inverse frequencies and the attention scale of cos/sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    t = scaling.rope_type
    if t == "default":
        return inv_freq, 1.0
    if t == "linear":
        return inv_freq / scaling.factor, 1.0
    if t == "dynamic":
        # Static NTK: the base is stretched for the full max_position up front, so
        # positions do not change meaning as the sequence grows (vLLM's choice too).
        orig = scaling.original_max_position_embeddings or max_pos
        new_base = base * ((scaling.factor * max_pos / orig) - (scaling.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (new_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if t == "llama3":
        orig = scaling.original_max_position_embeddings or 8192
        low_wavelen = orig / scaling.low_freq_factor
        high_wavelen = orig / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if t == "yarn":
        return _yarn_inv_freq(base, dim, scaling, max_pos)
    raise ValueError(f"unsupported rope type {t!r}")


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: RopeScaling) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.base, self.scaling = head_dim, max_position, base, scaling
        self.register_buffer("cos", torch.empty(max_position, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_position, head_dim), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables, in float32, on the buffers' device (also after a
        model built on the meta device is materialised)."""
        inv_freq, mscale = inverse_frequencies(self.base, self.head_dim, self.scaling, self.max_position)
        pos = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [max_position, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        device = self.cos.device
        self.cos = (emb.cos() * mscale).to(device)
        self.sin = (emb.sin() * mscale).to(device)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; q [T, Hq, D], k [T, Hkv, D] -> rotated (same shapes)."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin
