"""The KV handoff protocol between a prefill worker (sender) and a decode worker
(receiver), on top of any KVTransport.

    decode worker                                   prefill worker
    reserve(): blocks set aside, recvs posted ─desc─► KVSender(desc): layouts checked,
      header + one recv per layer                     ack recv posted, header sent
                                                    layer 0 computed ─► pages of layer 0
      layer 0 arrives (timestamped)  ◄───────────── layer 1 computed ─► pages of layer 1
      ...                                             ...
      all layers in ─► ack ───────────────────────► finish(): sends done + ack = success

Tags: one 48-bit transfer id per request, shifted left 16 bits; the low 16 bits name
the message (layer index, HEADER, ACK), so many transfers share one endpoint. Only
the blocks the decode worker lacks travel (``start_block``, ``num_blocks``).

What a layer message holds is the descriptor's PayloadPlan (chosen by the decode
worker at reserve time):
- identity (preset ``none``): the layer's pages as one contiguous buffer
  ``[num_blocks, 2, block_size, Hkv, D]`` in the cache dtype, as before;
- otherwise: one framed message (``cluster.kv_codec``): the kept tokens' K and V of
  the shipped suffix, token-major, quantized, scales beside them. Its size is at most
  the plan's capacity; the receiver posts buffers that large and reads the header.
Every wait has the descriptor's deadline; on any failure the decode worker recomputes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from cluster import kv_codec
from cluster.compression import PayloadPlan
from cluster.kv_layout import KVLayout, LayoutMismatchError
from cluster.transport.base import KVTransport, TransferError
from cluster.worker_api import TransferDescriptor

HEADER = 0xFFFE
ACK = 0xFFFF
HEADER_BYTES = 4096
ACK_OK = 1


def new_transfer_tag(request_id: str) -> int:
    """A fresh 48-bit id per transfer attempt, in the high bits of a 64-bit tag."""
    return (xxhash.xxh3_64(f"{request_id}/{uuid.uuid4()}".encode()).intdigest() & ((1 << 48) - 1)) << 16


@dataclass
class ReceivedKV:
    """What arrived for one request: raw pages (identity plan) or one framed message
    per layer (decoded on install, on the decode worker's engine thread)."""

    desc: TransferDescriptor
    pages: list[torch.Tensor] | None  # identity: per layer [num_blocks, 2, bs, Hkv, D]
    messages: list[torch.Tensor] | None  # otherwise: per layer uint8 receive buffers
    sizes: list[int]  # bytes received per layer

    @functools.cached_property
    def _quantizer(self) -> kv_codec.Quantizer:
        return self.desc.quantizer()

    @property
    def lossless(self) -> bool:
        return self.desc.plan.identity

    @property
    def bytes_received(self) -> int:
        return sum(self.sizes)

    def num_tokens(self, layer: int) -> int:
        return kv_codec.read_layer_tokens(self.messages[layer], self.sizes[layer])

    def layer_tokens(self, layer: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [n, Hkv, D] of one layer's kept tokens, dequantized to ``dtype``.
        Raises kv_codec.CodecError for a malformed message."""
        lay = self.desc.layout
        return kv_codec.decode_layer(self._quantizer, self.messages[layer], self.sizes[layer], layer,
                                     lay.num_kv_heads, lay.head_dim, dtype, device)


@dataclass
class TransferOutcome:
    ok: bool
    reason: str | None  # None when ok; a TransferError reason otherwise
    bytes_sent: int  # KV payload bytes (headers and acks excluded)
    full_bytes: int  # what shipping every prompt page would have cost
    layer_sent_at: dict[int, float] = field(default_factory=dict)  # wall clock, per layer
    seconds: float = 0.0  # first page sent -> the receiver's ack (or the failure)


def _as_future(f: Future, remaining: float) -> asyncio.Future:
    return asyncio.wait_for(asyncio.wrap_future(f), max(remaining, 0.001))


class KVSender:
    """Prefill side of one transfer. ``send_layer`` is called from the engine thread."""

    def __init__(self, transport: KVTransport, desc: TransferDescriptor, layout: KVLayout, num_prompt_blocks: int) -> None:
        if transport.name != desc.transport:
            raise LayoutMismatchError(f"decode worker uses transport {desc.transport!r}, this worker {transport.name!r}")
        layout.check_peer(desc.layout, "decode worker")
        self.transport, self.desc, self.layout = transport, desc, layout
        self.deadline = time.monotonic() + desc.timeout_s
        self.created_at = time.time()
        self.full_bytes = num_prompt_blocks * layout.num_layers * layout.bytes_per_block_per_layer
        # The same prompt in 16-bit KV (what GPU deployments keep): ratios are quoted against it.
        self.full_bytes_16bit = self.full_bytes * 2 // layout.element_size
        self.bytes_sent = 0
        self.layer_sent_at: dict[int, float] = {}
        self._futures: list[Future] = []
        self._ack_buf = np.zeros(8, dtype=np.uint8)
        self._ack = transport.recv(desc.tag | ACK, self._ack_buf, desc.timeout_s)
        header = json.dumps(
            {"wire": layout.wire_version, "layout": layout.digest(), "sender": transport.address.hex(),
             "request_id": desc.request_id, "layers": layout.num_layers, "capacity_per_layer": desc.capacity_per_layer,
             "codec": desc.plan.quantization, "sparse": desc.plan.sparse}
        ).encode()
        self._futures.append(transport.send(desc.receiver, desc.tag | HEADER, header.ljust(HEADER_BYTES), desc.timeout_s))

    def send_layer(self, layer: int, payload: torch.Tensor) -> None:
        """payload: contiguous, ready to read; the layer's pages ``[num_blocks, 2,
        block_size, Hkv, D]`` (identity plan) or its framed message (uint8)."""
        remaining = self.deadline - time.monotonic()
        self._futures.append(self.transport.send(self.desc.receiver, self.desc.tag | layer, payload, max(remaining, 0.001)))
        self.bytes_sent += payload.numel() * payload.element_size()
        self.layer_sent_at[layer] = time.time()

    async def finish(self) -> TransferOutcome:
        """Wait for every send and the receiver's ack, within the deadline."""
        try:
            for f in self._futures:
                await _as_future(f, self.deadline - time.monotonic())
            await _as_future(self._ack, self.deadline - time.monotonic())
            if int(self._ack_buf[0]) != ACK_OK:
                raise TransferError("peer", "decode worker refused the transfer")
            return self._outcome(True, None)
        except TransferError as e:
            return self._outcome(False, e.reason)
        except (asyncio.TimeoutError, TimeoutError):
            return self._outcome(False, "timeout")

    def _outcome(self, ok: bool, reason: str | None) -> TransferOutcome:
        # From the first page sent (the header alone when the decode side lacked nothing).
        start = min(self.layer_sent_at.values(), default=self.created_at)
        return TransferOutcome(ok, reason, self.bytes_sent, self.full_bytes, dict(self.layer_sent_at), time.time() - start)


class KVReceiver:
    """Decode side of one transfer: posts its receives at once (so layers can land
    while the prefill still runs) and records when each layer arrived."""

    def __init__(self, transport: KVTransport, desc: TransferDescriptor, dtype: torch.dtype, device: torch.device,
                 wait_s: float | None = None) -> None:
        """``wait_s``: how long the pages may take from now (default the descriptor's
        transfer deadline). A receiver posted at reservation, before the prefill runs,
        must also allow for the prefill, which may queue behind others on its worker."""
        self.transport, self.desc = transport, desc
        lay = desc.layout
        wait_s = desc.timeout_s if wait_s is None else wait_s
        self.wait_s = wait_s
        self.deadline = time.monotonic() + wait_s
        self.layer_received_at: dict[int, float] = {}
        self._header = np.zeros(HEADER_BYTES, dtype=np.uint8)
        self._header_f = transport.recv(desc.tag | HEADER, self._header, wait_s)
        if desc.plan.identity:
            shape = (desc.num_blocks, 2, lay.block_size, lay.num_kv_heads, lay.head_dim)
            self.layers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(lay.num_layers)]
        else:  # framed messages of at most the plan's capacity
            self.layers = [torch.empty(desc.capacity_per_layer, dtype=torch.uint8, device=device) for _ in range(lay.num_layers)]
        self._layer_f: list[Future] = []
        if desc.num_blocks:
            # The callbacks hold the dict, never ``self``: a done Future keeps its callbacks,
            # so one that held the receiver would make receiver -> future -> callback ->
            # receiver a cycle, and every request's receive buffers (the prompt's KV, MiBs)
            # would wait for the cyclic gc's rare full collections, a decode worker's
            # memory growing with every request under load (bench/heap_growth.py).
            received_at = self.layer_received_at
            for i, buf in enumerate(self.layers):
                f = transport.recv(desc.tag | i, buf, wait_s)
                f.add_done_callback(lambda _f, i=i: received_at.setdefault(i, time.time()))
                self._layer_f.append(f)

    async def wait(self) -> ReceivedKV:
        """All layers, after checking the sender's header; then ack. Raises TransferError."""
        sizes = []
        try:
            await _as_future(self._header_f, self.deadline - time.monotonic())
            header = json.loads(bytes(self._header).rstrip(b" \x00"))
            if header["wire"] != self.desc.layout.wire_version or header["layout"] != self.desc.layout.digest():
                raise TransferError("peer", f"sender's wire version/layout differ: {header}")
            for f in self._layer_f:
                sizes.append(await _as_future(f, self.deadline - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            raise TransferError("timeout", f"KV for {self.desc.request_id} did not arrive within {self.wait_s}s") from None
        ack = np.array([ACK_OK] + [0] * 7, dtype=np.uint8)
        self.transport.send(bytes.fromhex(header["sender"]), self.desc.tag | ACK, ack, 5.0)
        identity = self.desc.plan.identity
        return ReceivedKV(self.desc, self.layers if identity else None, None if identity else self.layers, sizes)
