"""The worker contract (cluster/worker_api.py): torch-free for the router, one typed
interface for every call, and the actor class that carries exactly that interface."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import pytest

from cluster.worker_actor import WorkerActor, worker_class
from cluster.worker_api import STREAMING_CALLS, WORKER_CALLS, WorkerAPI
from cluster.worker_handle import WorkerHandle


def test_router_imports_no_torch():
    code = ("import sys, router.api, router.service, router.serve_app, cluster.cluster, cluster.worker_actor; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(len(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _params(fn) -> list[str]:
    # Ray adds `_ray_trace_ctx` to an actor class's methods once the class has been made
    # remote in this process (an earlier test started a cluster): not part of the contract.
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "_ray_trace_ctx")]


def test_actor_class_carries_exactly_the_protocol():
    actor_calls = {n for n, f in vars(WorkerActor).items() if callable(f) and not n.startswith("_")}
    assert actor_calls == WORKER_CALLS
    for name in WORKER_CALLS:
        assert _params(getattr(WorkerActor, name)) == _params(getattr(WorkerAPI, name)), name
        streaming = inspect.isasyncgenfunction(getattr(WorkerActor, name))
        assert streaming == (name in STREAMING_CALLS), name


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_worker_classes_implement_their_calls_with_the_protocols_signature(role):
    cls = worker_class(role)
    own = {"prefill": {"prefill", "shadow_decode", "prefill_log"}, "decode": {"reserve", "decode", "transfer_log"},
           "colocated": WORKER_CALLS}[role]
    common = {"health", "get_layout", "stats", "kv_events", "kv_snapshot", "cached_prefix_blocks", "transport_address",
              "abort", "drain", "generate"}
    for name in own | common:
        assert hasattr(cls, name), (role, name)
        assert _params(getattr(cls, name)) == _params(getattr(WorkerAPI, name)), (role, name)


def test_handle_refuses_strings_and_the_wrong_kind_of_call():
    h = WorkerHandle("decode", 0, object(), is_ray=False)

    async def go():
        with pytest.raises(TypeError, match="not a WorkerAPI call"):
            await h.call("reserve", timeout_s=1)
        with pytest.raises(TypeError, match="a stream: use stream"):
            await h.call(WorkerAPI.decode, "r", None, timeout_s=1)
        with pytest.raises(TypeError, match="not a stream"):
            async for _ in h.stream(WorkerAPI.health, item_timeout_s=1):
                pass

    asyncio.run(go())
