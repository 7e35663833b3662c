"""Per-role engine configs: the pools' thread counts and the engine kernels reach each
worker's EngineConfig."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig, ConfigError


@pytest.mark.parametrize("overrides,expected", [
    ({}, {"prefill": 1, "decode": 1, "colocated": 1}),
    ({"pools.threads_per_worker": 2}, {"prefill": 2, "decode": 2, "colocated": 2}),
    ({"pools.cpus_per_worker": 4}, {"prefill": 4, "decode": 4, "colocated": 4}),
    ({"pools.prefill_threads": 2}, {"prefill": 2, "decode": 1, "colocated": 1}),
    ({"pools.threads_per_worker": 3, "pools.decode_threads": 1}, {"prefill": 3, "decode": 1, "colocated": 1}),
])
def test_threads_per_role(overrides, expected):
    cfg = ClusterConfig.build({}, overrides)
    assert {role: cfg.engine_config(role).num_threads for role in expected} == expected


def test_kernels_reach_the_engine_config():
    cfg = ClusterConfig.build({}, {"engine.linear_kernel": "torch", "engine.attention_backend": "torch"})
    e = cfg.engine_config("decode")
    assert (e.linear_kernel, e.attention_backend) == ("torch", "torch")
    assert ClusterConfig.build({}).engine_config("prefill").linear_kernel == "auto"
    with pytest.raises(ConfigError, match="linear_kernel"):
        ClusterConfig.build({}, {"engine.linear_kernel": "mkl"})
    with pytest.raises(ConfigError, match="prefill_threads"):
        ClusterConfig.build({}, {"pools.prefill_threads": 0})


@pytest.mark.parametrize("overrides,cpus,prefill", [
    ({}, 2, 2),  # kvrelay serve on a small CPU host: 2 prefill workers
    ({}, 4, 2),
    ({}, 1, 1),
    ({}, 16, 1),
    ({"pools.prefill_workers": 1}, 2, 1),  # said by the user: kept
    ({"pools.prefill_workers": 3}, 2, 3),
    ({"pools.colocated": True}, 2, 1),
    ({"pools.gpus_per_worker": 1}, 2, 1),
])
def test_sized_for_host(overrides, cpus, prefill):
    cfg = ClusterConfig.build({}, overrides).sized_for_host(cpus)
    assert cfg.pools.prefill_workers == prefill
    assert cfg.pools.decode_workers == 1
