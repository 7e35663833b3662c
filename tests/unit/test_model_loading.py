"""The engine's Llama model + HF safetensors loader agree with transformers' own
LlamaForCausalLM.

Every case builds a TINY random-weight model with ``transformers`` (fixed seed, no
hub, no download), saves it with ``save_pretrained(..., safe_serialization=True)``,
loads the directory with ``workers.loader`` and runs it through the real
``Engine`` (paged KV, scheduler, torch attention backend). The logits the engine
samples from (captured with ``runner.logits_hook``) must match HF's full-sequence
forward at the same positions, and greedy tokens must match HF ``generate``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from workers.config import EngineConfig  # noqa: E402
from workers.engine import Engine  # noqa: E402
from workers.loader import load_model, resolve_model  # noqa: E402
from workers.model.config import ModelConfig, RopeScaling  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

ATOL = 1e-4
MAX_POS = 512
BLOCK = 16

# ---------------------------------------------------------------------------------
# helpers


def _hf_config(
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    tie: bool = False,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    head_dim: int | None = None,
    rope_parameters: dict | None = None,
    vocab: int = 256,
):
    kw = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        # no EOS: greedy runs go the full max_tokens on both sides
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if head_dim is not None:
        kw["head_dim"] = head_dim
    return transformers.LlamaConfig(**kw)


def _build_hf(cfg, seed: int, path: Path):
    """HF model with fixed random weights, saved as safetensors in ``path``.

    HF's init gives zero biases and unit norms (and tiny std-0.02 weights, whose
    logits nearly tie); every parameter is redrawn so biases, norm weights and
    greedy choices are all actually exercised."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared (tied) params appear once
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.set_attn_implementation("eager")
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def _run_engine(loaded, prompts: dict[str, list[int]], max_tokens: int, **engine_kw):
    """Run prompts as one continuous batch; returns per request the list of [V]
    logits rows the engine sampled from and the generated tokens."""
    need = sum(-(-(len(p) + max_tokens) // BLOCK) for p in prompts.values())
    cfg = EngineConfig(
        num_kv_blocks=need + 4,
        block_size=BLOCK,
        max_model_len=MAX_POS,
        attention_backend="torch",
        device="cpu",
        dtype="float32",
        **engine_kw,
    )
    engine = Engine(cfg, loaded=loaded)
    captured: dict[str, list[torch.Tensor]] = {rid: [] for rid in prompts}

    def hook(ids: list[str], logits: torch.Tensor) -> None:
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), loaded.config.vocab_size)
        for i, rid in enumerate(ids):
            captured[rid].append(logits[i].detach().clone())

    engine.runner.logits_hook = hook
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    for _ in range(10_000):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert not engine.has_unfinished
    return captured, tokens


def _hf_reference(hf, prompt: list[int], generated: list[int], k: int):
    """HF logits at the positions the engine sampled from, and HF greedy tokens."""
    seq = torch.tensor([prompt + generated[: k - 1]])
    with torch.no_grad():
        logits = hf(input_ids=seq).logits[0].float()  # [L, V]
        n = len(prompt)
        ref_logits = logits[n - 1 : n - 1 + k]
        gen = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return ref_logits, gen[0, n:].tolist()


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# ---------------------------------------------------------------------------------
# HF parity across architecture variants

_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}

# id -> (hf config kwargs, prompt length, engine kwargs)
VARIANTS = {
    "mha": (dict(heads=4, kv_heads=4), 40, {}),
    "gqa": (dict(heads=4, kv_heads=2, layers=3), 40, {}),
    "mqa": (dict(heads=4, kv_heads=1), 40, {}),
    "gqa_tied": (dict(heads=4, kv_heads=2, tie=True), 40, {}),
    "mqa_tied": (dict(heads=4, kv_heads=1, tie=True, vocab=512), 40, {}),
    "attention_bias": (dict(heads=4, kv_heads=2, attention_bias=True), 40, {}),
    "mlp_bias": (dict(heads=4, kv_heads=2, attention_bias=True, mlp_bias=True), 40, {}),
    "head_dim_32": (dict(heads=4, kv_heads=2, head_dim=32), 40, {}),
    "rope_theta_500k": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), 40, {}),
    "rope_linear": (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), 40, {}),
    "rope_llama3": (dict(rope_parameters=_LLAMA3), 200, {}),
    # chunked prefill (64-token chunks after a cached prefix) on the long prompt
    "rope_yarn": (dict(rope_parameters=_YARN), 200, dict(chunk_size=64, max_num_batched_tokens=64)),
    "rope_yarn_short": (dict(rope_parameters=_YARN), 40, {}),
}

K = 5  # sampled rows compared: the prefill's last token + 4 decode steps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_matches_hf(variant: str, tmp_path: Path) -> None:
    hf_kw, prompt_len, engine_kw = VARIANTS[variant]
    seed = sorted(VARIANTS).index(variant)
    hf_cfg = _hf_config(**hf_kw)
    hf = _build_hf(hf_cfg, seed, tmp_path)
    if hf_kw.get("tie"):
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    # the saved config.json is what the engine parses
    saved = json.loads((tmp_path / "config.json").read_text())
    mc = ModelConfig.from_hf_dict(saved)
    rp = hf_kw.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
    assert mc.rope_theta == rp["rope_theta"]
    assert mc.rope_scaling.rope_type == rp["rope_type"]
    assert mc.rope_scaling.factor == rp.get("factor", 1.0)
    if "original_max_position_embeddings" in rp:
        assert mc.rope_scaling.original_max_position_embeddings == rp["original_max_position_embeddings"]
    assert mc.num_kv_heads == hf_cfg.num_key_value_heads
    assert mc.head_dim == hf_cfg.head_dim
    assert mc.tie_word_embeddings == bool(hf_kw.get("tie", False))
    assert mc.attention_bias == bool(hf_kw.get("attention_bias", False))
    assert mc.mlp_bias == bool(hf_kw.get("mlp_bias", False))

    source = resolve_model(str(tmp_path))
    assert source.kind == "safetensors"
    loaded = load_model(source, dtype=torch.float32)
    assert loaded.config == dataclasses.replace(mc, name=tmp_path.name)
    m = loaded.model
    if mc.tie_word_embeddings:
        assert m.lm_head.weight is m.embed_tokens.weight
    else:
        assert not torch.equal(m.lm_head.weight, m.embed_tokens.weight)
        torch.testing.assert_close(m.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)

    prompt = _prompt(prompt_len, mc.vocab_size, seed)
    captured, tokens = _run_engine(loaded, {"r": prompt}, K, **engine_kw)
    got = torch.stack(captured["r"])
    assert got.shape == (K, mc.vocab_size)
    assert len(tokens["r"]) == K
    # temperature 0 means argmax of the very logits the hook saw
    assert tokens["r"] == got.argmax(-1).tolist()

    ref, hf_tokens = _hf_reference(hf, prompt, tokens["r"], K)
    diff = (got - ref).abs().max().item()
    assert diff < ATOL, f"{variant}: max |engine - HF| logits = {diff:.3e}"
    assert tokens["r"] == hf_tokens


def test_batched_requests_match_hf(tmp_path: Path) -> None:
    """Several requests of different lengths in one continuous batch (padded decode,
    prefills admitted in the same step) each match HF run alone."""
    hf = _build_hf(_hf_config(heads=4, kv_heads=2), 7, tmp_path)
    loaded = load_model(resolve_model(str(tmp_path)), dtype=torch.float32)
    prompts = {f"r{i}": _prompt(n, 256, 50 + i) for i, n in enumerate((40, 17, 65))}
    captured, tokens = _run_engine(loaded, prompts, K)
    for rid, prompt in prompts.items():
        got = torch.stack(captured[rid])
        ref, hf_tokens = _hf_reference(hf, prompt, tokens[rid], K)
        diff = (got - ref).abs().max().item()
        assert diff < ATOL, f"{rid}: max |engine - HF| logits = {diff:.3e}"
        assert tokens[rid] == hf_tokens


def test_rope_scaling_changes_logits(tmp_path: Path) -> None:
    """Guard against a vacuous parity check: the scaled-RoPE model really differs
    from the same weights with plain RoPE at the compared positions."""
    a = _build_hf(_hf_config(rope_parameters=_YARN), 3, tmp_path / "a")
    b = _build_hf(_hf_config(), 3, tmp_path / "b")
    seq = torch.tensor([_prompt(200, 256, 3)])
    with torch.no_grad():
        assert (a(input_ids=seq).logits - b(input_ids=seq).logits).abs().max() > 1e-2


# ---------------------------------------------------------------------------------
# config parsing


def _base_hf_dict(**extra) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    d.update(extra)
    return d


def test_from_hf_dict_legacy_rope_scaling() -> None:
    mc = ModelConfig.from_hf_dict(
        _base_hf_dict(rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=[5, 7])
    )
    assert mc.rope_theta == 250000.0
    assert mc.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    assert mc.eos_token_ids == (5, 7)
    assert mc.head_dim == 16


def test_from_hf_dict_rope_parameters() -> None:
    mc = ModelConfig.from_hf_dict(_base_hf_dict(rope_parameters=dict(_LLAMA3), eos_token_id=3))
    assert mc.rope_theta == 10000.0
    assert mc.rope_scaling.rope_type == "llama3"
    assert mc.rope_scaling.factor == 8.0
    assert mc.rope_scaling.low_freq_factor == 1.0
    assert mc.rope_scaling.high_freq_factor == 4.0
    assert mc.rope_scaling.original_max_position_embeddings == 128
    assert mc.eos_token_ids == (3,)
    plain = ModelConfig.from_hf_dict(_base_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert plain.rope_theta == 5e5 and plain.rope_scaling == RopeScaling()


def test_from_hf_dict_rejects_other_architectures() -> None:
    with pytest.raises(ValueError, match="not a Llama-family"):
        ModelConfig.from_hf_dict(_base_hf_dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]))


def test_model_config_rejects_bad_kv_heads() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=3, head_dim=16, max_position_embeddings=512,
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf_dict(_base_hf_dict(num_attention_heads=6, num_key_value_heads=4))


def test_rope_scaling_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unsupported rope scaling type"):
        RopeScaling(rope_type="longrope")
    with pytest.raises(ValueError, match="unsupported rope scaling type"):
        RopeScaling.from_hf({"rope_type": "su", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope scaling type"):
        ModelConfig.from_hf_dict(_base_hf_dict(rope_scaling={"type": "bogus", "factor": 2.0}))
    with pytest.raises(ValueError, match="positive"):
        RopeScaling(rope_type="linear", factor=0.0)


# ---------------------------------------------------------------------------------
# resolve_model


def test_resolve_model_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_resolve_model_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_model_dir_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_base_hf_dict()))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_resolve_model_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(f))


def test_resolve_model_ids(tmp_path: Path) -> None:
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_base_hf_dict()))
    (d / "model.safetensors").write_bytes(b"")
    src = resolve_model(str(d))
    assert (src.kind, src.path, src.model_id, src.directory) == ("safetensors", d, "my-model", d)
    assert resolve_model(d, model_id="alias").model_id == "alias"
    g = tmp_path / "tiny.gguf"
    g.write_bytes(b"")
    src = resolve_model(str(g))
    assert (src.kind, src.model_id, src.directory) == ("gguf", "tiny", tmp_path)
