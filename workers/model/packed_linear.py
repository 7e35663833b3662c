"""Linear layers with oneDNN-packed weights: the CPU decode step's matmuls.

A decode step multiplies a few rows (one per running sequence) by every weight matrix
of the model. torch's default CPU ``linear`` (a plain row-major GEMM) runs such skinny
products far below this machine's arithmetic and memory speed. oneDNN's matmul on a
weight reordered once into its blocked layout ("packed") does the same product about
twice as fast at 8-32 rows, and 1.2-1.3x faster on prefill chunks
(``python -m bench.linear_floor`` measures both). The result differs from torch's by
float32 rounding only (a different summation order, ~1e-6 relative).

``set_linear_kernel(model, "onednn")`` swaps every ``nn.Linear`` of the model for a
:class:`PackedLinear` holding the packed weight (the plain one is dropped, so memory does
not grow, except that a tied ``lm_head`` gets its own packed copy: the embedding keeps
the plain rows it looks up). ``set_linear_kernel(model, "torch")`` restores plain
``nn.Linear`` layers (the reorder is exact both ways). The layout belongs to the model,
so the last engine built on a shared model decides it.
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("auto", "torch", "onednn")

# The row count oneDNN lays the packed weight out for. Any row count runs; 1 is slow
# for batches, and 8 to 256 measured the same on this machine's CPU.
_BATCH_HINT = 32
# oneDNN builds and keeps a primitive, with memory that stays (~0.45 MiB per weight
# shape), for every new row count it multiplies. A prefill worker sees every chunk
# length, so row counts are padded up to a few buckets: exact up to 8, multiples of 8 up
# to 64 (a product of so few rows costs the weight read, not the rows), multiples of 64
# above: at most 15 + max_rows / 64 row counts per weight shape ever
# (``python -m bench.heap_growth --linear-rows 256`` measures the memory per kernel).
_EXACT_ROWS = 8


def _bucket(rows: int) -> int:
    return -(-rows // 8) * 8 if rows <= 64 else -(-rows // 64) * 64


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r} (choose {', '.join(KERNELS)})")
    if kernel == "auto":
        return "onednn" if onednn_available(device, dtype) else "torch"
    if kernel == "onednn" and not onednn_available(device, dtype):
        raise ValueError(f"the onednn linear kernel needs a CPU with oneDNN and float32/bfloat16 (got {device}, {dtype})")
    return kernel


class PackedLinear(nn.Module):
    """``nn.Linear``'s product through oneDNN on a packed weight (CPU only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight (a copy, reordered back): for inspection, not the hot path."""
        return self.packed_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= _EXACT_ROWS or rows == _bucket(rows):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        # Padded to a bucket's row count; each output row is its input row's product alone.
        padded = x.new_zeros(_bucket(rows), self.in_features)
        padded[:rows] = x.reshape(rows, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(padded, self.packed_weight, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, onednn"


def set_linear_kernel(model: nn.Module, kernel: str) -> str:
    """Lay out every linear layer of ``model`` for ``kernel`` (in place); -> the kernel used."""
    some = next(model.parameters())
    kernel = resolve_kernel(kernel, some.device, some.dtype)
    tied = getattr(model, "config", None) is not None and getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if kernel == "onednn" and type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
                elif kernel == "torch" and isinstance(child, PackedLinear):
                    setattr(parent, name, _plain(child))
        if kernel == "torch" and tied:
            model.lm_head.weight = model.embed_tokens.weight  # the tie, restored
    return kernel


def _plain(p: PackedLinear) -> nn.Linear:
    weight = p.weight
    lin = nn.Linear(p.in_features, p.out_features, bias=p.bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if p.bias is not None:
        lin.bias = nn.Parameter(p.bias.detach(), requires_grad=False)
    return lin
