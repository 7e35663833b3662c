"""flashinfer (CUDA) against the torch reference backend, on the real SmolLM2 in bf16.

Skipped without CUDA or without flashinfer; run on a GPU machine with
``python -m pytest -q -m gpu tests/gpu`` and keep the log in bench/results/."""

from __future__ import annotations

import pytest
import torch

from tests.integration.prompts import mixed_prompts
from workers.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def gpu_model(smollm2_source):
    pytest.importorskip("flashinfer")
    from workers.loader import load_model

    return load_model(smollm2_source, dtype=torch.bfloat16, device="cuda")


def _engine(loaded, backend, **kw):
    from workers.config import EngineConfig
    from workers.engine import Engine

    return Engine(EngineConfig(device="cuda", dtype="bfloat16", attention_backend=backend, num_kv_blocks=2048, **kw), loaded=loaded)


def _run_with_logits(engine, prompts, params):
    logits: dict[str, list[torch.Tensor]] = {}
    engine.runner.logits_hook = lambda ids, lg: [logits.setdefault(r, []).append(lg[i].float().cpu()) for i, r in enumerate(ids)]
    ids = [f"g{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    outs: dict[str, list[int]] = {r: [] for r in ids}
    while engine.has_unfinished:
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    return [outs[r] for r in ids], [logits[r] for r in ids]


def test_flashinfer_matches_torch_backend(gpu_model, tokenizer):
    prompts = mixed_prompts(tokenizer)
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0)
    ref_out, ref_logits = _run_with_logits(_engine(gpu_model, "torch"), prompts, params)
    fi_out, fi_logits = _run_with_logits(_engine(gpu_model, "flashinfer"), prompts, params)
    for i in range(len(prompts)):
        # first sampled row: same context on both sides, so logits are comparable
        diff = (fi_logits[i][0] - ref_logits[i][0]).abs().max().item()
        scale = ref_logits[i][0].abs().max().item()
        assert diff <= 0.02 * scale + 0.1, f"prompt {i}: max abs logit diff {diff} (scale {scale})"
    assert fi_out == ref_out


def test_flashinfer_prefix_reuse_and_chunked_prefill(gpu_model, tokenizer):
    prompts = mixed_prompts(tokenizer)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    whole = _engine(gpu_model, "flashinfer", enable_prefix_caching=False).generate(prompts, params)
    engine = _engine(gpu_model, "flashinfer", chunk_size=32, max_num_batched_tokens=256)
    assert engine.generate(prompts, params) == whole
    before = engine.stats.prefill_computed_tokens
    assert engine.generate(prompts, params) == whole  # second pass hits the prefix cache
    assert engine.stats.prefill_computed_tokens - before < sum(len(p) for p in prompts) // 4
