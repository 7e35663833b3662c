"""Read a Llama-family GGUF file: its architecture and its tensors, dequantized.

GGUF stores Q and K projection rows permuted for llama.cpp's interleaved RoPE; we
undo that so the weights fit the rotate-half layout the rest of the engine uses.
Tensor names are translated to Hugging Face names so one loading path serves both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from workers.model.config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    import torch  # imported where tensors are made: reading a config needs no torch

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader: gguf.GGUFReader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama' family)")
    a = "llama."
    n_heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(_field(reader, a + "vocab_size", int(embd.shape[1])))
    scaling_type = _field(reader, a + "rope.scaling.type")
    scaling = RopeScaling()
    if scaling_type and scaling_type != "none":
        scaling = RopeScaling(
            rope_type=str(scaling_type),
            factor=float(_field(reader, a + "rope.scaling.factor", 1.0)),
            original_max_position_embeddings=_field(reader, a + "rope.scaling.original_context_length"),
        )
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_layers=int(_field(reader, a + "block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, a + "attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, a + "rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=int(_field(reader, a + "context_length", 2048)),
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=name,
    )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (half, pair) row interleave of Q/K weights."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")  # suffix: weight | bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def iter_tensors(reader: gguf.GGUFReader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor, dequantized."""
    import torch

    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = _unpermute_rope_rows(w, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute_rope_rows(w, cfg.num_kv_heads)
        yield _hf_name(t.name), torch.from_numpy(np.array(w, dtype=np.float32, copy=True))


def open_gguf(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))
