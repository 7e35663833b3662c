"""Start a kvrelay cluster on this machine (the embedded mode): local Ray, the pools,
and a clean shutdown, Ray included."""

from __future__ import annotations

import logging
import os

from cluster.cluster import KVRelayCluster
from cluster.config import ClusterConfig

log = logging.getLogger(__name__)


def ray_needed(config: ClusterConfig) -> bool:
    # The in-process transport cannot cross processes: its workers live in this one.
    return config.pools.colocated or config.transfer.transport != "inprocess"


def init_ray(config: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    workers = config.pools.decode_workers + (0 if config.pools.colocated else config.pools.prefill_workers)
    # Logical CPUs: enough slots for every worker actor even on a 2-core machine
    # (each actor pins its own torch thread count).
    cpus = max(os.cpu_count() or 1, int(workers * config.pools.cpus_per_worker + 0.999))
    # Join an existing cluster only when told to (RAY_ADDRESS, e.g. on KubeRay); never
    # attach by accident to another Ray instance that happens to run on this host.
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        num_cpus=cpus if address == "local" else None,
        include_dashboard=False,
        log_to_driver=os.environ.get("KVRELAY_RAY_LOGS", "0") == "1",
        configure_logging=False,
    )


async def start_cluster(config: ClusterConfig) -> KVRelayCluster:
    """Start the pools. Pass the config the router hashes with (``with_hash_seed()``
    applied), so both key block hashes alike; one without a seed gets a fresh one."""
    config = config.with_hash_seed()
    use_ray = ray_needed(config)
    if use_ray:
        init_ray(config)
    cluster = KVRelayCluster(config, use_ray=use_ray)
    await cluster.start()
    return cluster


async def stop_cluster(cluster: KVRelayCluster) -> None:
    try:
        await cluster.shutdown()
    finally:
        if cluster.use_ray:
            import ray

            if ray.is_initialized():
                ray.shutdown()
