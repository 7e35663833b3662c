"""Compression settings fail at the edge with the field named; a peer with another
codec version is refused at handshake; the payload plan is a pure function of the
prompt's numbers (the decode worker posts its receives before the prefill runs)."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.compression import CODEC_VERSION, PRESETS, CompressionSection
from cluster.config import ClusterConfig, ConfigError
from cluster.kv_layout import KVLayout, LayoutMismatchError


@pytest.mark.parametrize("overrides, field", [
    ({"transfer.compression.keep": 0}, "keep"),
    ({"transfer.compression.keep": 1.5}, "keep"),
    ({"transfer.compression.preset": "ultra"}, "unknown kv_compression preset 'ultra'"),
    ({"transfer.compression.mode": "sparse", "transfer.compression.token_budget": 20}, "token_budget (20) is below sinks + window"),
    ({"transfer.compression.kernel": 8}, "kernel must be odd"),
    ({"transfer.compression.quantization": "int3"}, "quantization"),
    ({"transfer.compression.budgets": "steep"}, "budgets must be uniform, pyramid"),
    ({"transfer.compression.shadow": 1}, "shadow: unknown key"),
])
def test_bad_settings_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        ClusterConfig.build({}, overrides)
    assert field in str(e.value)


def test_unknown_preset_lists_every_preset():
    with pytest.raises(ConfigError) as e:
        ClusterConfig.build({}, {"transfer.compression.preset": "ultra"})
    assert all(p in str(e.value) for p in PRESETS)
    with pytest.raises(ValueError, match="choose one of: none, int8"):
        CompressionSection().resolve("ultra")


def test_presets_resolve_and_overrides_are_labelled():
    sec = ClusterConfig.build({}, {"transfer.compression.preset": "balanced", "transfer.compression.keep": 0.3}).transfer.compression
    label, s = sec.resolve(None)
    assert label == "balanced*" and s.keep == 0.3 and s.sparse and s.quantization == "int4"
    label, s = sec.resolve("none")  # a named preset is the built-in one: none is lossless
    assert label == "none" and s.lossless
    assert sec.resolve("max")[1] == PRESETS["max"]


def test_a_peer_with_another_codec_version_is_refused_naming_it():
    ours = KVLayout("m", "float32", 30, 3, 64, 16)
    theirs = dataclasses.replace(ours, codec_version=CODEC_VERSION + 1)
    with pytest.raises(LayoutMismatchError, match=f"codec_version: {CODEC_VERSION} vs {CODEC_VERSION + 1}"):
        ours.check_peer(theirs, "decode worker")


def test_operator_presets_resolve_by_name_and_cannot_shadow_built_in_ones():
    sec = ClusterConfig.build({}, {"transfer.compression.presets": {
        "long-docs": {"preset": "max", "keep": 0.3, "budgets": "learned"}}}).transfer.compression
    label, s = sec.resolve("long-docs")
    assert label == "long-docs" and s.keep == 0.3 and s.quantization == "int4" and s.budgets == "learned"
    assert sec.names()[-1] == "long-docs" and sec.resolve(None)[0] == "none"
    with pytest.raises(ValueError, match="choose one of: none, int8, fp8, int4, balanced, max, long-docs"):
        sec.resolve("ultra")
    for bad, why in [({"none": {"preset": "int4"}}, "built-in preset name"),
                     ({"x": {"preset": "ultra"}}, "unknown kv_compression preset 'ultra'"),
                     ({"x": {"preset": "max", "keep": 2}}, "keep")]:
        with pytest.raises(ConfigError, match=why):
            ClusterConfig.build({}, {"transfer.compression.presets": bad})
    with pytest.raises(ConfigError, match="profile must be auto or a profile .json path"):
        ClusterConfig.build({}, {"transfer.compression.profile": "weights.txt"})


# ---- prefix_cache: the deployment's block-hash seed (issue 12) --------------------------


def test_hash_seed_generated_once_per_deployment_and_never_shown():
    import json

    from cluster.config import ClusterConfig, ConfigError

    cfg = ClusterConfig.build({})
    assert cfg.prefix_cache.hash_seed is None and cfg.engine_config().hash_seed is None
    seeded = cfg.with_hash_seed()
    seed = seeded.engine_config().hash_seed
    assert isinstance(seed, bytes) and len(seed) == 32
    assert seeded.with_hash_seed() is seeded  # idempotent: router and workers get the same one
    assert cfg.with_hash_seed().engine_config().hash_seed != seed  # another start, another seed
    hexed = seed.hex()
    for shown in (repr(seeded), str(seeded), json.dumps(seeded.model_dump(mode="json")), repr(seeded.engine_config())):
        assert hexed not in shown
    # A configured seed (several deployments that must agree) is used as given.
    fixed = ClusterConfig.build({"prefix_cache": {"hash_seed": "ab" * 32}})
    assert fixed.with_hash_seed() is fixed and fixed.engine_config().hash_seed == bytes.fromhex("ab" * 32)
    # Round trip as the Serve builder binds it (model_dump keeps the secret in python mode).
    assert ClusterConfig.build(seeded.model_dump()).engine_config().hash_seed == seed
    for bad, words in (("zz" * 16, "must be hex"), ("ab" * 8 + "a", "must be hex"), ("ab" * 15, "16 to 64 bytes")):
        with pytest.raises(ConfigError, match=words) as e:
            ClusterConfig.build({"prefix_cache": {"hash_seed": bad}})
        assert "prefix_cache.hash_seed" in str(e.value) and bad not in str(e.value)
