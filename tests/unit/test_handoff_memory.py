"""A finished KV handoff leaves nothing for the cyclic gc: the receive buffers (the
prompt's KV, MiBs a request) go back when the last reference goes, not at the gc's rare
full collections. A cycle through a done Future's callbacks once held every request's
buffers on the decode worker until then: its RSS grew with every request under load
(bench/results/soak.md, bench/heap_growth.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from cluster.compression import PayloadPlan
from cluster.kv_handoff import KVReceiver, KVSender, new_transfer_tag
from cluster.kv_layout import KVLayout
from cluster.transport import make_transport
from cluster.worker_api import TransferDescriptor

LAYOUT = KVLayout(model_id="tiny", dtype="float32", num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)


def _descriptor(receiver: bytes, transport: str, num_blocks: int) -> TransferDescriptor:
    tokens = num_blocks * LAYOUT.block_size
    plan = PayloadPlan(preset="none", quantization="none", group_size=0, sparse=False, region_start=0,
                       region_tokens=tokens, budgets=(tokens,) * LAYOUT.num_layers, capacity_tokens=tokens)
    return TransferDescriptor("req-1", new_transfer_tag("req-1"), receiver, transport, LAYOUT, 0, num_blocks, 10.0, plan)


def _transports(name: str):
    if name == "ucx":
        pytest.importorskip("ucxx")
    return make_transport(name), make_transport(name)


@pytest.mark.parametrize("transport", ["inprocess", "ucx"])
def test_a_received_handoff_is_freed_without_the_cyclic_gc(transport):
    prefill, decode = _transports(transport)
    gc.collect()
    gc.disable()  # only reference counting frees anything below
    try:
        async def handoff():
            desc = _descriptor(decode.address, transport, num_blocks=2)
            receiver = KVReceiver(decode, desc, torch.float32, torch.device("cpu"))
            sender = KVSender(prefill, desc, LAYOUT, num_prompt_blocks=2)
            pages = [torch.full((2, 2, 4, 2, 8), float(layer)) for layer in range(LAYOUT.num_layers)]
            for layer, page in enumerate(pages):
                sender.send_layer(layer, page)
            kv = await receiver.wait()
            outcome = await sender.finish()
            assert outcome.ok and [float(p[0, 0, 0, 0, 0]) for p in kv.pages] == [0.0, 1.0, 2.0]
            assert sorted(receiver.layer_received_at) == [0, 1, 2]  # the callbacks still record arrivals
            return weakref.ref(receiver), [weakref.ref(p) for p in kv.pages], weakref.ref(kv)

        receiver, buffers, kv = asyncio.run(handoff())
        assert receiver() is None and kv() is None
        assert all(b() is None for b in buffers), "receive buffers held by a reference cycle"
    finally:
        gc.enable()
        prefill.close()
        decode.close()
