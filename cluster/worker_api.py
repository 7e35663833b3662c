"""The worker contract: what crosses the process boundary between the router (and its
cluster) and a worker actor, and the calls a worker accepts.

Torch-free on purpose: the router replica imports this module (and unpickles these
types from the workers' replies) without loading torch. Tensors never cross here;
the sampling RNG travels as the bytes of ``torch.Generator.get_state()``.

    router / cluster                                   worker actor
    WorkerHandle.call(WorkerAPI.reserve, ...)  ──────►  reserve(...) -> TransferDescriptor
    WorkerHandle.stream(WorkerAPI.decode, ...) ──────►  decode(...)  => RequestOutput, ...
    CapacityError / ValueError / LayoutMismatchError ◄─ raised by the worker, unwrapped
    WorkerDiedError / TimeoutError                   ◄─ the handle's own: dead or late
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cluster.compression import CompressionSection, PayloadPlan
from cluster.kv_events import KVEvent, KVSnapshot
from cluster.kv_layout import KVLayout
from workers.config import EngineConfig  # torch-free at import
from workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cluster import kv_codec

# ---- errors a worker raises (or the handle raises for it) -----------------------------


class CapacityError(RuntimeError):
    """The KV pool cannot take this request now (retry later or elsewhere)."""


class WorkerDiedError(RuntimeError):
    """The worker process died (or was killed) while serving a call."""


# ---- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (tokens are the *new* ones)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int
    # The request's sampling RNG after this output's last token (torch generator state
    # bytes); only for seeded random sampling, so a migrated request samples on.
    rng_state: bytes | None = None
    # With params.prompt_logprobs, on the request's first token only: per prompt position
    # the logprob of that prompt token (position 0: None).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output carrying both steps' tokens, as if ``later`` had come in one piece
    with ``first`` (a consumer that lagged gets what piled up in one message)."""
    return RequestOutput(
        first.request_id, first.new_token_ids + later.new_token_ids, first.new_logprobs + later.new_logprobs,
        later.finished, later.finish_reason, later.num_prompt_tokens, later.num_cached_tokens, later.num_output_tokens,
        later.rng_state if later.rng_state is not None else first.rng_state,
        first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
    )


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    first_logprobs: TokenLogprobs | None
    rng_state: bytes | None  # the sampling RNG after the first token (generator state bytes)
    num_prompt_tokens: int
    num_cached_tokens: int  # served from this worker's prefix cache
    bytes_sent: int  # KV payload handed to the transport (only what D lacks, compressed)
    full_bytes: int  # the whole prompt's KV in the cache dtype
    full_bytes_16bit: int  # the whole prompt's KV in 16-bit (what ratios are quoted against)
    preset: str  # the payload's compression label
    kept_fraction: float  # mean over layers of the shipped suffix's tokens kept (1.0 when dense)
    guard_raised_layers: int  # layers the quality guard sent with more tokens than planned
    min_mass: float  # lowest per-layer attention mass of the kept tokens (1.0 when dense)
    encode_seconds: float  # selection + gather + quantization, all layers
    layer_computed_at: dict[int, float]  # wall clock when each layer's K/V were in the cache
    layer_sent_at: dict[int, float]
    prefill_seconds: float
    # params.prompt_logprobs: the prompt tokens' logprobs, computed during this prefill
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True)
class WorkerHealth:
    role: str
    index: int
    pid: int
    started_at: float  # changes when the worker restarts
    engine_alive: bool
    running: int
    waiting: int
    kv_usage: float
    free_blocks: int
    total_blocks: int
    max_model_len: int
    metrics_address: str | None = None  # "ip:port" of this worker's /metrics


@dataclass(frozen=True)
class WorkerSpec:
    """How to build one worker (the actor's constructor argument)."""

    role: str  # "prefill" | "decode" | "colocated"
    index: int
    engine: EngineConfig
    transport: str  # "ucx" | "inprocess" | "none"
    token_timeout_s: float = 60.0
    transfer_timeout_s: float = 30.0
    prefill_timeout_s: float = 120.0
    layerwise: bool = True  # ship each layer as soon as it is computed
    compression: CompressionSection = CompressionSection()  # transfer.compression: the default payload
    # Prometheus endpoint of this worker: None = none; 0 = a free port.
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None
    heap_trim_s: float = 30.0  # malloc_trim this often (0: never); cluster/heap_trim.py
    # Test-only fault injection on this worker's sends: {"mode": "fail"|"drop"|"delay", "delay_s": s}
    transport_faults: dict | None = None


@dataclass(frozen=True)
class TransferDescriptor:
    """Made by the decode worker, carried to the prefill worker: where and what to send."""

    request_id: str
    tag: int
    receiver: bytes  # the decode worker's transport address
    transport: str
    layout: KVLayout  # the decode worker's
    start_block: int  # first prompt block the decode worker lacks
    num_blocks: int  # blocks to send, from start_block
    timeout_s: float
    plan: PayloadPlan

    def quantizer(self) -> "kv_codec.Quantizer":
        import torch

        from cluster import kv_codec

        return kv_codec.get_quantizer(self.plan.quantization, raw_dtype=getattr(torch, self.layout.dtype),
                                      group_size=self.plan.group_size)

    @property
    def capacity_per_layer(self) -> int:
        """Bytes of the largest message one layer may send (the receive buffer size)."""
        if self.num_blocks == 0:
            return 0
        if self.plan.identity:
            return self.num_blocks * self.layout.bytes_per_block_per_layer
        from cluster import kv_codec

        lay = self.layout
        return kv_codec.layer_message_bytes(self.quantizer(), self.plan.capacity_tokens, lay.num_kv_heads, lay.head_dim)


# ---- the calls --------------------------------------------------------------------------


class WorkerAPI(Protocol):
    """Every call a worker accepts. Prefill, decode and colocated workers implement the
    role's subset (a call outside it raises AttributeError); ``cluster.worker_actor``
    is the Ray actor class with exactly these methods, and ``WorkerHandle.call`` /
    ``stream`` take these methods (``WorkerAPI.reserve``), never a string."""

    # probes and introspection (every role)
    async def health(self) -> WorkerHealth: ...
    async def get_layout(self) -> KVLayout: ...
    async def stats(self) -> dict[str, Any]: ...
    async def kv_events(self) -> list[KVEvent]: ...
    async def kv_snapshot(self) -> KVSnapshot: ...
    async def cached_prefix_blocks(self, block_hashes: list[int]) -> int: ...
    async def transport_address(self) -> bytes | None: ...
    async def abort(self, request_id: str) -> bool: ...
    async def drain(self, timeout_s: float = 30.0) -> bool: ...

    # colocated: the whole request on one worker
    def generate(self, request_id: str, prompt: list[int], params: SamplingParams, compression: str | None = None,
                 rng_state: bytes | None = None) -> AsyncIterator[RequestOutput]: ...

    # decode side of a handoff
    async def reserve(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_layout: KVLayout,
                      compression: str | None = None) -> TransferDescriptor: ...
    def decode(self, request_id: str, first_token: int | None, first_logprobs: TokenLogprobs | None = None,
               rng_state: bytes | None = None) -> AsyncIterator[RequestOutput]: ...
    async def transfer_log(self, request_id: str) -> dict[int, float]: ...

    # prefill side of a handoff
    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, desc: TransferDescriptor,
                      rng_state: bytes | None = None) -> PrefillResult: ...
    async def shadow_decode(self, request_id: str, prompt: list[int], first_token: int, num_tokens: int) -> list[int]: ...
    async def prefill_log(self, request_id: str) -> PrefillResult | None: ...


# The names of WorkerAPI's calls: a WorkerHandle refuses anything else.
WORKER_CALLS = frozenset(n for n in vars(WorkerAPI) if not n.startswith("_"))
STREAMING_CALLS = frozenset({"generate", "decode"})
