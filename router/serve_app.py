"""Ray Serve ingress: the FastAPI app of router/api.py in a Serve deployment whose
replica owns the RouterService (and through it the worker pools).

Serve config (deploy/serve/kvrelay.yaml, the Helm chart) points at the builder:

    import_path: router.serve_app:build
    args: {router: {policy: kv_aware}, pools: {prefill_workers: 1, decode_workers: 1}, ...}

``args`` is a ClusterConfig in dict form, validated by kvrelay's own config parser.
The block-hash key comes from env KVRELAY_HASH_SEED where the replica runs, if set,
else it is drawn when the application is built."""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from cluster.config import ClusterConfig
from router.api import app, install
from router.service import RouterService


@serve.deployment(
    name="kvrelay-router",
    num_replicas=1,
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},  # I/O bound: leave the CPU slots to the workers
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(app)
class KVRelayRouter:
    async def __init__(self, config: dict[str, Any]) -> None:
        self.service = RouterService(replica_config(config))
        install(self.service)
        await self.service.start()

    async def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError("router is not ready")

    async def __del__(self) -> None:
        await self.service.stop()


def replica_config(config: dict[str, Any]) -> ClusterConfig:
    """The replica's config: the bound one, its block-hash key replaced by env
    KVRELAY_HASH_SEED where set (the Helm chart's hashSeed Secret, in the head pod where
    the replica runs); the pools the replica starts get that key."""
    seed = os.environ.get("KVRELAY_HASH_SEED") or None
    return ClusterConfig.build(config, {"prefix_cache.hash_seed": seed})


def build(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application builder (``import_path: router.serve_app:build``)."""
    # Fails here, at deploy time, on a bad config; a deployment without a configured
    # hash seed gets its secret one here, and every replica is bound with it.
    config = ClusterConfig.build(args).with_hash_seed()
    return KVRelayRouter.bind(config.model_dump())
