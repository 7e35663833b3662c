"""Shared fixtures: the real SmolLM2 (loaded once per session), its tokenizer, and the
Hugging Face transformers model of the same GGUF file as the oracle."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_source():
    from workers.loader import resolve_model

    return resolve_model()


@pytest.fixture(scope="session")
def smollm2(smollm2_source):
    """The engine's own load of SmolLM2 in float32 (weights shared by every engine)."""
    from workers.loader import load_model

    return load_model(smollm2_source, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(smollm2_source):
    from router.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def hf_model(smollm2_source):
    """transformers' LlamaForCausalLM from the same GGUF (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_source.directory), gguf_file=smollm2_source.path.name, dtype=torch.float32
    ).eval()


@pytest.fixture
def make_engine(smollm2):
    """Build an engine on the shared SmolLM2 weights: make_engine(**EngineConfig fields)."""
    from workers.config import EngineConfig
    from workers.engine import Engine

    def make(**kw):
        kw.setdefault("num_kv_blocks", 1024)
        return Engine(EngineConfig(**kw), loaded=smollm2)

    return make


@pytest.fixture(scope="module")
def ray_runtime():
    """A local Ray instance for one test module (never an unrelated one on this host)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
