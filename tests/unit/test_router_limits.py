"""The router's in-flight limits answer 429 from its middleware, before the endpoint
runs: without reading the body, and without raising through Starlette's http middleware
(an exception raised there comes back as a reference cycle of frames, which on a burst
of 429s was the router's memory left per burst: bench/results/overload-bursts.md). The
live-server 429 tests are tests/integration/test_reliability.py and test_api.py."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from cluster.config import ClusterConfig
from router import api
from router.metrics import RouterMetrics


@pytest.fixture
def limited():
    """The app with a service at its in-flight limit (nothing else of it is reached)."""
    cfg = ClusterConfig.build({"router": {"max_inflight": 4, "max_inflight_per_key": 2}})
    svc = SimpleNamespace(config=cfg, metrics=RouterMetrics(lambda: [], lambda: [], lambda: None), model_id="m",
                          ready=True, inflight=4, inflight_by_key={}, max_model_len=4096)
    before = api._current.get("service")
    api._current["service"] = svc
    try:
        yield svc, TestClient(api.app)
    finally:
        api._current["service"] = before


def _rate_limited_count(svc) -> float:
    text = generate_latest(svc.metrics.registry).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('kvrelay_requests_total{status="rate_limited"}'))


def test_over_the_limit_is_429_before_the_body_is_read(limited):
    svc, client = limited
    # not even JSON: the limit answers first
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "in flight" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429
    assert _rate_limited_count(svc) == 2


def test_the_per_key_limit_too(limited):
    svc, client = limited
    svc.inflight = 0
    svc.inflight_by_key = {"k1": 2}
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1},
                    headers={"authorization": "Bearer k1"})
    assert r.status_code == 429 and "this API key" in r.json()["error"]["message"]


def test_a_429_leaves_no_middleware_frames_for_the_cyclic_gc(limited):
    _, client = limited
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    client.post("/v1/completions", json=body)
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            assert client.post("/v1/completions", json=body).status_code == 429
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        frames = [o.f_code.co_filename for o in gc.garbage if type(o).__name__ == "frame"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # (the test client's own machinery leaves cycles too: only the middleware's are checked)
    assert not [f for f in frames if f.endswith("starlette/middleware/base.py")]
