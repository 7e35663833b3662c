"""The oneDNN linear kernel (packed weights, the CPU default) against torch's linear, the
reference: the same products within float32 rounding, the same greedy tokens on the
real model, and an exact way back (weights and the tied embedding restored)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.model.packed_linear import PackedLinear, resolve_kernel, set_linear_kernel
from workers.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 8, 32, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_torch_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 160, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 96, generator=gen) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(160, generator=gen))
    packed = PackedLinear(lin.weight, lin.bias)
    x = torch.randn(rows, 96, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
        # a strided (non-contiguous) input and a 3-D one, as the model's views can be
        xs = torch.randn(rows, 192, generator=gen)[:, ::2]
        torch.testing.assert_close(packed(xs), lin(xs), rtol=1e-5, atol=1e-5)
        x3 = x.view(1, rows, 96)
        assert packed(x3).shape == (1, rows, 160)
    assert torch.equal(packed.weight, lin.weight.detach())  # the reorder loses nothing


def test_resolve_kernel():
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu, torch.float32) == "onednn"
    assert resolve_kernel("auto", cpu, torch.float16) == "torch"  # oneDNN linear here: fp32 and bf16 only
    assert resolve_kernel("auto", torch.device("cuda"), torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="needs a CPU"):
        resolve_kernel("onednn", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="unknown linear kernel"):
        resolve_kernel("mkl", cpu, torch.float32)


def test_engine_greedy_tokens_and_logits_match_the_reference(make_engine, smollm2, tokenizer):
    """The real model, both kernels on the same weights: identical greedy tokens for a
    batch (prefill and decode steps) and logits within float32 rounding."""
    prompts = [tokenizer.encode(t) for t in (
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea, there lived",
    )]
    params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
    runs = {}
    for kernel in ("torch", "onednn", "torch"):  # and back: the exact way home
        engine = make_engine(linear_kernel=kernel)
        assert engine.linear_kernel == kernel
        logits: list[torch.Tensor] = []
        engine.runner.logits_hook = lambda ids, lg: logits.append(lg.clone())
        runs.setdefault(kernel, []).append((engine.generate(prompts, params), logits))
    (ref_tokens, ref_logits), (back_tokens, back_logits) = runs["torch"]
    tokens, logits = runs["onednn"][0]
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    # back to torch: bit-identical to the first reference run, the tie restored
    assert back_tokens == ref_tokens
    assert all(torch.equal(a, b) for a, b in zip(back_logits, ref_logits))
    model = smollm2.model
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
    set_linear_kernel(model, "auto")  # leave the shared model as the default engines expect


def test_row_counts_fall_into_few_buckets():
    """oneDNN keeps memory per row count it has multiplied: every row count a worker can
    see (up to a 2,048-token step) maps to at most 47 padded ones, each >= the real one."""
    from workers.model.packed_linear import _EXACT_ROWS, _bucket

    padded = {r if r <= _EXACT_ROWS else _bucket(r) for r in range(1, 2049)}
    assert len(padded) <= 15 + 2048 // 64
    assert all(_bucket(r) >= r for r in range(1, 2049))
