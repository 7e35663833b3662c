"""Build a LlamaForCausalLM and fill it from a checkpoint, with a progress bar.

Both readers yield Hugging Face tensor names; this module maps them onto the
engine's fused parameters (q|k|v and gate|up)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from workers.loader import gguf_file, safetensors_dir
from workers.loader.source import ModelSource
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF name inside a layer -> (engine parameter, slot in the fused tensor)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_GLOBAL = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    source: ModelSource | None
    dtype: torch.dtype
    device: torch.device


def _fused_rows(cfg: ModelConfig, param: str) -> list[int]:
    if param.endswith("qkv_proj"):
        kv = cfg.num_kv_heads * cfg.head_dim
        return [cfg.num_heads * cfg.head_dim, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _assign(model: LlamaForCausalLM, params: dict[str, torch.Tensor], name: str, w: torch.Tensor) -> str | None:
    """Copy one HF tensor into the model; returns the engine parameter filled."""
    cfg = model.config
    if name in _GLOBAL:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return None  # tied: the embedding already holds it
        target = _GLOBAL[name]
        params[target].copy_(w)
        return target
    m = _LAYER.fullmatch(name)
    if m is None:
        if name.endswith("rotary_emb.inv_freq"):
            return None
        raise KeyError(f"unexpected tensor {name!r} in checkpoint")
    layer, rest = m.groups()
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        fused, slot = _FUSED[module]
        target = f"layers.{layer}.{fused}.{kind}"
        rows = _fused_rows(cfg, fused)
        start = sum(rows[:slot])
        params[target][start : start + rows[slot]].copy_(w)
        return target
    target = f"layers.{layer}.{rest}"
    if target not in params:
        raise KeyError(f"unexpected tensor {name!r} in checkpoint")
    params[target].copy_(w)
    return target


def _build_empty(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie; restore it
        model.lm_head.weight = model.embed_tokens.weight
    model.layers[0].self_attn.rope.reset()
    return model.eval()


def _fill(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]], total: int, desc: str) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    with torch.no_grad():
        for name, w in tqdm(tensors, total=total, desc=desc, unit="tensor", leave=False):
            target = _assign(model, params, name, w)
            if target is not None:
                filled.add(target)
    missing = set(params) - filled
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    device = torch.device(device)
    if source.kind == "gguf":
        reader = gguf_file.open_gguf(source.path)
        cfg = gguf_file.read_config(reader, source.model_id)
        model = _build_empty(cfg, dtype, device)
        _fill(model, gguf_file.iter_tensors(reader, cfg), len(reader.tensors), f"loading {source.path.name}")
    else:
        cfg = safetensors_dir.read_config(source.path, source.model_id)
        model = _build_empty(cfg, dtype, device)
        n = len(safetensors_dir.tensor_names(source.path))
        _fill(model, safetensors_dir.iter_tensors(source.path), n, f"loading {source.path.name}")
    log.info("loaded %s (%s, %d layers) as %s on %s", source.model_id, source.kind, cfg.num_layers, dtype, device)
    return LoadedModel(model, cfg, source, dtype, device)


def random_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> LoadedModel:
    """A model of ``cfg``'s shape with random weights (tests, GPU benchmarks)."""
    device = torch.device(device)
    model = _build_empty(cfg, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return LoadedModel(model, cfg, None, dtype, device)
