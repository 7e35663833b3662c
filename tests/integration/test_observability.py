"""Live observability: a real `kvrelay serve` (Ray, UCX, SmolLM2) under a short load,
scraped by a real Prometheus (Debian's package) with deploy/prometheus/ as shipped.
Every process is discovered and scraped, every metric of the contract exists, and every
expression of every dashboard panel and alert rule answers with data."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bench.prometheus import PrometheusServer, alert_rules, as_bool_comparison, dashboard_queries
from bench.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MODEL = "SmolLM2-135M-Instruct"

ROUTER_METRICS = {
    "kvrelay_requests_total", "kvrelay_time_to_first_token_seconds_bucket", "kvrelay_inter_token_latency_seconds_bucket",
    "kvrelay_e2e_request_latency_seconds_bucket", "kvrelay_prompt_tokens_total", "kvrelay_generation_tokens_total",
    "kvrelay_router_predicted_hit_tokens_total", "kvrelay_router_decisions_total", "kvrelay_router_index_blocks",
    "kvrelay_router_index_evictions_total", "kvrelay_worker_up", "kvrelay_worker_restarts_total",
    "kvrelay_admission_queue_depth", "kvrelay_admission_wait_seconds_bucket", "kvrelay_admission_rejections_total",
    "kvrelay_request_migrations_total", "kvrelay_request_retries_total", "kvrelay_router_placement_cost_bucket",
}
WORKER_METRICS = {
    "kvrelay_request_queue_time_seconds_bucket", "kvrelay_prefix_cache_query_tokens_total",
    "kvrelay_prefix_cache_hit_tokens_total", "kvrelay_prefill_computed_tokens_total", "kvrelay_kv_cache_usage_ratio",
    "kvrelay_running_requests", "kvrelay_waiting_requests", "kvrelay_preemptions_total",
    "kvrelay_kv_transfer_bytes_total", "kvrelay_kv_transfer_full_bytes_total", "kvrelay_kv_transfer_seconds_bucket",
    "kvrelay_kv_transfer_failures_total", "kvrelay_kv_recomputes_total",
    "kvrelay_kv_transfer_full_16bit_bytes_total", "kvrelay_kv_compression_fallbacks_total",
    "kvrelay_kv_compression_kept_ratio_bucket",
}
SYSTEM = "You are a terse assistant for a platform team. Answer in one short sentence."


async def _load(url: str) -> int:
    """Two multi-turn conversations sharing a system prompt, streamed and not, plus
    one bad request; returns the number of successful requests."""
    ok = 0
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=180) as c:
        async def conversation(topic: str, stream: bool) -> int:
            messages = [{"role": "system", "content": SYSTEM}]
            done = 0
            for turn in range(3):
                messages.append({"role": "user", "content": f"Tell me fact {turn + 1} about {topic}."})
                body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "stream": stream}
                r = await c.post("/chat/completions", json=body)
                assert r.status_code == 200, r.text
                text = r.text if stream else r.json()["choices"][0]["message"]["content"]
                messages.append({"role": "assistant", "content": text[:200]})
                done += 1
            return done

        results = await asyncio.gather(conversation("KV caches", False), conversation("GPUs", True))
        ok += sum(results)
        bad = await c.post("/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400
    return ok


@pytest.fixture(scope="module")
def stack():
    with Server("observability", ["--prefill-workers", "1", "--set", "engine.kv_cache_memory_gb=0.25", "--set", "engine.max_model_len=2048"]) as kv:
        with PrometheusServer(kv.url) as prom:
            prom.wait_for_targets(3)  # the router, prefill-0, decode-0
            ok = asyncio.run(_load(kv.url))
            # Until Prometheus has scraped the final counts, then a few more samples so
            # that every rate() window holds at least two points after the load.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = prom.query('sum(kvrelay_requests_total{status="ok"})')["data"]["result"]
                if r and float(r[0]["value"][1]) >= ok:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("prometheus never saw the load's requests")
            time.sleep(3)
            yield kv, prom


def test_every_process_is_discovered_and_scraped(stack):
    _, prom = stack
    targets = prom.active_targets()
    assert len(targets) == 3
    assert all(t["health"] == "up" for t in targets), targets
    series = prom.query('count by (role, worker) (kvrelay_kv_cache_usage_ratio)')["data"]["result"]
    assert {(s["metric"]["role"], s["metric"]["worker"]) for s in series} == {("prefill", "prefill-0"), ("decode", "decode-0")}


def test_the_metric_contract_is_exact(stack):
    _, prom = stack
    names = {s["metric"]["__name__"] for s in prom.query('count by (__name__) ({__name__=~"kvrelay_.*"})')["data"]["result"]}
    missing = (ROUTER_METRICS | WORKER_METRICS) - names
    assert not missing, f"not exported: {sorted(missing)}"
    # Worker series carry role and worker; transfer failures also their reason.
    for name in WORKER_METRICS:
        for s in prom.query(name)["data"]["result"]:
            assert {"role", "worker"} <= set(s["metric"]), (name, s["metric"])
    reasons = prom.query("kvrelay_kv_transfer_failures_total")["data"]["result"]
    assert {"timeout", "peer"} <= {s["metric"]["reason"] for s in reasons}
    # Byte counters per compression preset; fallbacks by reason, each from the start.
    for name in ("kvrelay_kv_transfer_bytes_total", "kvrelay_kv_transfer_full_bytes_total",
                 "kvrelay_kv_transfer_full_16bit_bytes_total"):
        assert "none" in {s["metric"]["preset"] for s in prom.query(name)["data"]["result"]}, name
    fallbacks = prom.query("kvrelay_kv_compression_fallbacks_total")["data"]["result"]
    assert {s["metric"]["reason"] for s in fallbacks} == {"guard", "capacity", "preempted", "codec"}


def test_the_load_is_visible(stack):
    _, prom = stack

    def value(expr: str) -> float:
        result = prom.query(expr)["data"]["result"]
        assert result, expr
        return float(result[0]["value"][1])

    assert value('sum(kvrelay_requests_total{status="ok"})') >= 6
    assert value('sum(kvrelay_requests_total{status="bad_request"})') >= 1
    assert value("sum(kvrelay_time_to_first_token_seconds_count)") >= 6
    assert value('sum(kvrelay_prefill_computed_tokens_total{role="prefill"})') > 0
    # multi-turn: later turns hit the prefix cache on the prefill worker
    assert value('sum(kvrelay_prefix_cache_hit_tokens_total{role="prefill"})') > 0
    assert value("sum(kvrelay_kv_transfer_bytes_total)") > 0
    # only the pages the decode worker lacked went on the wire
    assert value("sum(kvrelay_kv_transfer_full_bytes_total)") >= value("sum(kvrelay_kv_transfer_bytes_total)")
    assert value("min(kvrelay_worker_up)") == 1


def test_every_dashboard_expression_returns_data(stack):
    _, prom = stack
    queries = dashboard_queries(rate_interval="1m")
    assert len({uid for uid, _, _ in queries}) >= 4, "expected the four dashboards"
    failures = []
    for uid, title, expr in queries:
        answer = prom.query(expr)
        if answer.get("status") != "success":
            failures.append(f"{uid} / {title}: {answer.get('error')} in {expr}")
        elif not answer["data"]["result"]:
            failures.append(f"{uid} / {title}: empty result for {expr}")
    assert not failures, "\n".join(failures)


def test_every_alert_is_loaded_and_evaluates(stack):
    _, prom = stack
    loaded = {r["name"]: r for r in prom.rules() if r["type"] == "alerting"}
    rules = alert_rules()
    assert {r["alert"] for r in rules} == set(loaded)
    failures = []
    for rule in rules:
        state = loaded[rule["alert"]]
        if state["health"] != "ok":
            failures.append(f"{rule['alert']}: rule health {state['health']}: {state.get('lastError')}")
        expr = as_bool_comparison(rule["expr"])
        answer = prom.query(expr)
        if answer.get("status") != "success" or not answer["data"]["result"]:
            failures.append(f"{rule['alert']}: no data for {expr}: {answer.get('error')}")
    assert not failures, "\n".join(failures)
    assert loaded["KVRelayWorkerDown"]["state"] == "inactive"  # every worker is up
