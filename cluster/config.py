"""The cluster's typed configuration: YAML file + command-line overrides, validated
at start with messages that say what is wrong."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from cluster.compression import CompressionSection
from workers.config import EngineConfig


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSection(_Strict):
    model: str = "default"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    block_size: int = 16
    kv_cache_memory_gb: float = Field(0.5, gt=0)  # per worker
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    chunk_size: int = Field(512, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True
    # Decode workers: output tokens per request kept free in the KV pool when reserving
    # (workers/config.py); 0 = prompt only (running sequences may be preempted).
    decode_reserve_tokens: int = Field(256, ge=0)
    attention_backend: Literal["auto", "torch", "cpu", "flashinfer"] = "auto"
    decode_context_copies: bool = True  # cpu attention backend (workers/config.py)
    decode_context_copies_max_seqs: int = Field(16, ge=1)  # larger decode batches gather
    linear_kernel: Literal["auto", "torch", "onednn"] = "auto"  # auto: onednn (packed weights) on CPU


class PoolSection(_Strict):
    prefill_workers: int = Field(1, ge=0)
    decode_workers: int = Field(1, ge=1)
    colocated: bool = False  # every worker does prefill and decode; no transfer (the baseline)
    # Ray resources per worker actor. gpus_per_worker 0 = CPU actor; fractions let both
    # pools share one GPU for testing.
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads_per_worker: int | None = Field(None, ge=1)  # torch threads; default: cpus_per_worker
    # Per pool, over threads_per_worker (e.g. a decode pool that may use more cores than
    # its share while the prefill pool idles).
    prefill_threads: int | None = Field(None, ge=1)
    decode_threads: int | None = Field(None, ge=1)
    max_restarts: int = Field(3, ge=-1)  # Ray restarts a dead worker up to this many times (-1: forever)
    # Every worker process and the router give the heap memory glibc holds free back
    # to the kernel this often (malloc_trim; cluster/heap_trim.py); 0 = never.
    heap_trim_s: float = Field(30.0, ge=0)
    # Extra Ray custom resources per worker actor, e.g. {"kvrelay_prefill": 1} so that
    # prefill actors land only on the pods of the prefill worker group (the Helm chart
    # gives each group's pods one unit: one worker per pod).
    prefill_resources: dict[str, float] = Field(default_factory=dict)
    decode_resources: dict[str, float] = Field(default_factory=dict)


class TransferSection(_Strict):
    transport: Literal["ucx", "inprocess"] = "ucx"
    # Ship each layer's pages as soon as that layer is computed (hides the transfer
    # behind the remaining layers). False sends everything after the last layer: the
    # baseline the benchmark compares against.
    layerwise: bool = True
    # What crosses the wire: a preset (none | int8 | fp8 | int4 | balanced | max) and any
    # of its knobs overridden (cluster/compression.py). Requests may pick another preset
    # with the kv_compression body field.
    compression: CompressionSection = CompressionSection()


class Deadlines(_Strict):
    startup_s: float = Field(300.0, gt=0)  # a worker loads its model within this
    reserve_s: float = Field(30.0, gt=0)  # decode worker sets KV blocks aside
    prefill_s: float = Field(120.0, gt=0)  # prefill worker returns the first token
    transfer_s: float = Field(30.0, gt=0)  # all pages arrive (else recompute on decode)
    token_s: float = Field(60.0, gt=0)  # longest gap between two streamed tokens
    health_interval_s: float = Field(1.0, gt=0)
    health_timeout_s: float = Field(5.0, gt=0)
    drain_s: float = Field(30.0, gt=0)


class MetricsSection(_Strict):
    # Every worker process serves its own Prometheus /metrics; the router lists them
    # all (itself included) at /metrics/targets in Prometheus' HTTP service-discovery
    # format, so one scrape config reaches every process on every node.
    enabled: bool = True
    host: str = "0.0.0.0"  # the workers' metrics servers bind here
    # 0: each worker picks a free port (the embedded mode: several workers per host).
    # Fixed (e.g. 9400) on Kubernetes, where each pod runs one worker and a PodMonitor
    # scrapes that port.
    worker_port: int = Field(0, ge=0, le=65535)


class AdmissionSection(_Strict):
    # A request no decode worker has KV room for waits in its pool's queue (FIFO,
    # retries and migrations first) instead of failing; 503 + Retry-After only when
    # the queue is full or the wait passes queue_timeout_s. 0 = no queue.
    max_queued: int = Field(256, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    retry_after_s: float = Field(2.0, gt=0)  # Retry-After of a 503 from admission
    # Attempts per request: the first, then retries (before the first token) and
    # migrations (after it) on other workers; cluster/retry.py has the rules.
    max_attempts: int = Field(3, ge=1)


class KVAwareWeights(_Strict):
    """Weights of the kv_aware cost (router/placement.py), each in prefill tokens."""

    queue_weight: float = Field(0.2, ge=0, allow_inf_nan=False)  # per token already queued on P
    running_weight: float = Field(16.0, ge=0, allow_inf_nan=False)  # per sequence running on D
    kv_usage_weight: float = Field(512.0, ge=0, allow_inf_nan=False)  # D's KV pool going from empty to full
    transfer_weight: float = Field(1.0, ge=0, allow_inf_nan=False)  # per MiB shipped from P to D
    # Local prefill: a decode worker holding more of the prompt than every prefill worker
    # computes the rest itself when at most this many tokens are left and that costs less
    # than the best (P, D) pair; 0 = never (always ship from a prefill worker).
    local_prefill_max_tokens: int = Field(0, ge=0)  # off by default: see router/placement.py
    # ... and only while its KV pool is at most this full afterwards (under pressure the
    # prefix it holds is evicted before the request runs).
    local_prefill_max_kv_usage: float = Field(0.25, ge=0, le=1, allow_inf_nan=False)
    # A prefill worker's match under this share of the prompt counts as none (a shared
    # system-prompt header is not a conversation; new conversations spread by load).
    cold_match_share: float = Field(0.25, ge=0, le=1, allow_inf_nan=False)
    # A prompt no prefill worker holds also pays this per conversation the worker serves
    # now (router/live_prefixes.py): new conversations spread evenly over the caches.
    live_prefix_weight: float = Field(128.0, ge=0, allow_inf_nan=False)


class RouterSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None  # also KVRELAY_API_KEY; None: no authentication
    policy: Literal["kv_aware", "round_robin", "least_loaded"] = "kv_aware"
    served_model_name: str | None = None  # default: the model's id
    max_inflight: int = Field(256, ge=1)  # beyond this, 429 with Retry-After
    # Requests in flight per API key (the bearer token; requests without one share one
    # anonymous key); beyond this, 429 with Retry-After. None: no per-key limit.
    max_inflight_per_key: int | None = Field(None, ge=1)
    max_body_bytes: int = Field(8 * 2**20, ge=1024)  # larger request bodies: 413
    max_n: int = Field(16, ge=1, le=16)  # most choices (`n`) per request: 400 beyond (the API schema caps n at 16)
    # A conversation counts as live on its worker (kv_aware's live-prefix term) while a
    # turn of it runs and a think time after its last answer: twice the clients'
    # measured think time (p90 of recent gaps), at most this long (router/live_prefixes.py).
    live_prefix_window_s: float = Field(10.0, ge=0, allow_inf_nan=False)
    index_max_blocks: int = Field(1_000_000, ge=1)  # residency index cap (per pool)
    event_poll_s: float = Field(0.05, gt=0)  # how often worker KV events are drained
    kv_aware: KVAwareWeights = KVAwareWeights()


class PrefixCacheSection(_Strict):
    """Who may hit whose cached prefixes (cluster/block_hash.py)."""

    # The block hashes' secret key, hex (16 to 64 bytes). None: a fresh random one at
    # every start (kvrelay serve, the Serve replica), handed to the router and every
    # worker in this config. Set it (the same value everywhere) only where processes
    # that were not started together must agree on hashes. A SecretStr: never printed,
    # logged or dumped (check-config shows "**********"). Also KVRELAY_HASH_SEED.
    hash_seed: SecretStr | None = None
    # A request without a cache_salt but with a bearer key gets a namespace derived from
    # the key (tenants do not share cached prefixes); false: such requests share the
    # default namespace with requests that bring no key.
    namespace_per_key: bool = True

    @field_validator("hash_seed")
    @classmethod
    def _hex_seed(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        try:
            n = len(bytes.fromhex(v.get_secret_value()))
        except ValueError:
            raise ValueError("must be hex (e.g. `openssl rand -hex 32`)") from None
        if not 16 <= n <= 64:
            raise ValueError(f"must be 16 to 64 bytes (32 to 128 hex digits), got {n} bytes")
        return v

    def seed_bytes(self) -> bytes | None:
        return None if self.hash_seed is None else bytes.fromhex(self.hash_seed.get_secret_value())


class ClusterConfig(_Strict):
    router: RouterSection = RouterSection()
    engine: EngineSection = EngineSection()
    pools: PoolSection = PoolSection()
    transfer: TransferSection = TransferSection()
    deadlines: Deadlines = Deadlines()
    metrics: MetricsSection = MetricsSection()
    admission: AdmissionSection = AdmissionSection()
    prefix_cache: PrefixCacheSection = PrefixCacheSection()

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        if not self.pools.colocated and self.pools.prefill_workers < 1:
            raise ValueError("pools.prefill_workers must be >= 1 unless pools.colocated is true")
        if self.engine.chunk_size > self.engine.max_num_batched_tokens:
            raise ValueError(
                f"engine.chunk_size ({self.engine.chunk_size}) must not exceed "
                f"engine.max_num_batched_tokens ({self.engine.max_num_batched_tokens})"
            )
        self.engine_config()  # EngineConfig's own checks (block size, ...)
        return self

    def with_hash_seed(self) -> "ClusterConfig":
        """This config with a block-hash seed: the configured one, else a fresh secret
        (32 random bytes). Called once where a deployment starts; everything it starts
        gets the result, so router and workers hash alike."""
        if self.prefix_cache.hash_seed is not None:
            return self
        seeded = self.prefix_cache.model_copy(update={"hash_seed": SecretStr(secrets.token_hex(32))})
        return self.model_copy(update={"prefix_cache": seeded})

    def sized_for_host(self, cpu_count: int | None) -> "ClusterConfig":
        """`kvrelay serve`'s pool size where the user gave none: on a CPU host of 2-4
        cores, 2 single-thread prefill workers beside the decode worker (3 processes on
        the cores: the prefill side, compute-bound, takes the cycles the decode worker
        leaves between steps). Measured on 2 cores against 1 + 1 (`bench/results/peer.md`):
        1.06-1.31x the output tokens/s in every scenario. Elsewhere, and whenever
        ``pools.prefill_workers`` is set, the config is unchanged."""
        pools = self.pools
        if ("prefill_workers" in pools.model_fields_set or pools.colocated or pools.gpus_per_worker > 0
                or not cpu_count or not 2 <= cpu_count <= 4):
            return self
        return self.model_copy(update={"pools": pools.model_copy(update={"prefill_workers": 2})})

    def engine_config(self, role: str | None = None) -> EngineConfig:
        """The engine of a worker of ``role`` ("prefill", "decode" or "colocated"; the
        roles differ only in their thread count)."""
        e, pools = self.engine, self.pools
        threads = pools.threads_per_worker or max(1, int(pools.cpus_per_worker))
        if role == "prefill" and pools.prefill_threads:
            threads = pools.prefill_threads
        elif role in ("decode", "colocated") and pools.decode_threads:
            threads = pools.decode_threads
        device = "cuda" if self.pools.gpus_per_worker > 0 else "cpu"
        return EngineConfig(
            model=e.model, dtype=e.dtype, device=device, block_size=e.block_size,
            kv_cache_memory_gb=e.kv_cache_memory_gb, max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens, chunk_size=e.chunk_size,
            max_model_len=e.max_model_len, enable_prefix_caching=e.enable_prefix_caching,
            decode_reserve_tokens=e.decode_reserve_tokens,
            attention_backend=e.attention_backend, decode_context_copies=e.decode_context_copies,
            decode_context_copies_max_seqs=e.decode_context_copies_max_seqs,
            linear_kernel=e.linear_kernel, num_threads=threads,
            hash_seed=self.prefix_cache.seed_bytes(),
        )

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def build(cls, data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> "ClusterConfig":
        """From a nested dict plus dotted-key overrides (``{"pools.decode_workers": 2}``)."""
        merged = _deep_copy(data or {})
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            node = merged
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {p} is not a section")
            node[leaf] = value
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None
        except ValueError as e:
            raise ConfigError(f"invalid configuration: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "ClusterConfig":
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {str(p)!r} does not exist")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
        return cls.build(data, overrides)


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


_SECRET_KEYS = frozenset({"hash_seed", "api_key"})


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        elif not where:
            lines.append(msg)
        elif err["loc"] and err["loc"][-1] in _SECRET_KEYS:
            lines.append(f"{where}: {msg}")  # never echo a secret, not even a malformed one
        else:
            lines.append(f"{where}: {msg} (got {err.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
