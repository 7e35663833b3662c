"""The OpenAI API of a live `kvrelay serve` (real Ray, Ray Serve, worker actors, UCX,
SmolLM2), driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
KEY = "sk-test-kvrelay-0123456789"
MODEL = "SmolLM2-135M-Instruct"
PER_KEY = 3  # router.max_inflight_per_key of the server below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {**os.environ, "KVRELAY_API_KEY": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--api-key", KEY,
         "--prefill-workers", "1",  # one of each role (the host-sized default is tested in test_pool_config)
         "--set", "engine.kv_cache_memory_gb=0.25", "--set", "engine.max_model_len=2048",
         # the API's limits (tested in test_request_limits)
         "--set", f"router.max_inflight_per_key={PER_KEY}", "--set", "router.max_body_bytes=262144",
         "--set", "router.max_n=4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a busy 2-core CI host can take minutes to start Ray, Serve and two workers
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kvrelay serve exited early:\n{proc.stdout.read()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("kvrelay serve did not become healthy in time")
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: everything shuts down, Ray included
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("kvrelay serve did not stop within 60 s of SIGINT")
    assert proc.returncode == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(make_engine_module):
    return make_engine_module


@pytest.fixture(scope="module")
def make_engine_module(smollm2):
    from workers.config import EngineConfig
    from workers.engine import Engine

    return Engine(EngineConfig(num_kv_blocks=512), loaded=smollm2)


def _greedy_text(engine, tokenizer, prompt_ids, n):
    out = engine.generate([prompt_ids], SamplingParams(max_tokens=n, temperature=0.0))[0]
    return out, tokenizer.decode(out, skip_special_tokens=True)


def test_models_lists_the_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_greedy_equals_engine_and_usage(client, engine, tokenizer):
    messages = [{"role": "user", "content": "Name three primary colors."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    prompt = tokenizer.apply_chat_template(messages)
    toks, text = _greedy_text(engine, tokenizer, prompt, 24)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if len(toks) == 24 else "stop")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(toks)
    assert r.usage.total_tokens == len(prompt) + len(toks)

    # streamed: same text, usage in the last chunk
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    # the role travels with the first token (no empty chunk before the prefill), once
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content and text.startswith(chunks[0].choices[0].delta.content)
    assert [c.choices[0].delta.role for c in chunks if c.choices].count("assistant") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(toks)
    # the second identical request hit the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_completions_greedy_stream_and_not(client, engine, tokenizer):
    prompt = "The three laws of motion are"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    toks, text = _greedy_text(engine, tokenizer, ids, 20)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(toks)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == text
    # token-id prompts are accepted too
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert r2.choices[0].text == text


def test_stop_strings_cut_across_token_boundaries(client, engine, tokenizer):
    prompt = "List the planets of the solar system in order:"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    _, text = _greedy_text(engine, tokenizer, ids, 40)
    # a stop string made of the end of one word and the start of the next
    words = text.split(" ")
    assert len(words) > 5, text
    stop = words[3][-2:] + " " + words[4][:2]
    cut = text[: text.index(stop)]
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "zzzz"], stream=True) if c.choices)
        else:
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "zzzz"])
            got = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert got == cut and stop not in got


def test_n_choices_and_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say something."}],
                                       max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say something."}],
                                           max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]


def _post(server, path, body, key=KEY, raw=None):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{server}{path}", content=raw if raw is not None else json.dumps(body), headers=headers, timeout=60)


BAD = [
    ("malformed JSON", "/v1/completions", None, '{"model": ', 400, None),
    ("body not an object", "/v1/completions", None, "[1, 2]", 400, None),
    ("missing model", "/v1/completions", {"prompt": "hi"}, None, 400, None),
    ("prompt wrong type", "/v1/completions", {"model": MODEL, "prompt": 42}, None, 400, None),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, None, 400, None),
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, None, 400, None),
    ("max_tokens as bool", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": True}, None, 400, None),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 7}, None, 400, None),
    ("top_p zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, None, 400, None),
    ("n out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, None, 400, None),
    ("stream_options without stream", "/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, None, 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, None, 404, "model_not_found"),
    ("token id outside vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 999999]}, None, 400, None),
    ("over-long prompt", "/v1/completions", {"model": MODEL, "prompt": "word " * 2100, "max_tokens": 10}, None, 400, "context_length_exceeded"),
    ("prompt + max_tokens over context", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}, None, 400, "context_length_exceeded"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, None, 400, None),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400, None),
    ("message without content", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, None, 400, None),
    ("tools unsupported", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                   "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400, None),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "hi"}, None, 404, None),
    ("presence_penalty out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, None, 400, None),
    ("frequency_penalty out of range", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                                "frequency_penalty": -3}, None, 400, None),
    ("repetition_penalty zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, None, 400, None),
    ("logit_bias value out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 150}}, None, 400, None),
    ("logit_bias token outside vocabulary", "/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"999999": 5}}, None, 400, None),
    ("schema that does not compile", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, None, 400, None),
    ("schema with a broken pattern", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[a-"}}}}, None, 400, None),
    ("response_format type unknown", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                              "response_format": {"type": "grammar"}}, None, 400, None),
    ("batched prompt with an empty one", "/v1/completions", {"model": MODEL, "prompt": ["hi", ""]}, None, 400, None),
    ("suffix unsupported", "/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "end"}, None, 400, None),
]


def test_bad_input_matrix_then_still_serving(server, client):
    assert len(BAD) >= 30
    for name, path, body, raw, status, code in BAD:
        r = _post(server, path, body, raw=raw)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (name, err)
        if code:
            assert err["code"] == code, (name, err)
        assert r.headers.get("x-request-id"), name
    # the context error names both numbers
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000})
    assert "2048" in r.json()["error"]["message"] and "5000" in r.json()["error"]["message"]
    # the new fields' errors name the field
    for body, param in (({"model": MODEL, "prompt": "hi", "logit_bias": {"999999": 5}}, "logit_bias"),
                        ({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
                            "name": "x", "schema": {"type": "bogus"}}}}, "response_format"),
                        ({"model": MODEL, "prompt": "hi", "presence_penalty": 9}, "presence_penalty")):
        assert _post(server, "/v1/completions", body).json()["error"]["param"] == param, body
    # authentication
    for key in (None, "sk-wrong"):
        r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # and a normal request still works
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=5, temperature=0)
    assert r.choices[0].message.content


def test_request_limits(server, client):
    """Body size (413), n (400), requests in flight per API key (429 + Retry-After),
    each in OpenAI's envelope; the server serves normally right after."""
    big = _post(server, "/v1/completions", {"model": MODEL, "prompt": "word " * 60_000, "max_tokens": 1})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large", big.text
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 5, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most 4" in r.json()["error"]["message"]
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Count slowly to a thousand:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    open_streams = []  # kept referenced: a line iterator that is collected closes its connection
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(httpx.Client(timeout=60))
        for _ in range(PER_KEY):  # PER_KEY streams of this key, admitted and running
            r = stack.enter_context(http.stream("POST", f"{server}/v1/completions", json=body, headers=headers))
            assert r.status_code == 200
            lines = r.iter_lines()
            open_streams.append(lines)
            first = next(line for line in lines if line.startswith("data: {"))
            assert '"error"' not in first, first
        over = _post(server, "/v1/completions", {"model": MODEL, "prompt": "one more", "max_tokens": 1})
    assert over.status_code == 429 and over.headers.get("retry-after") == "1", over.text
    assert over.json()["error"]["code"] == "rate_limit_exceeded" and "API key" in over.json()["error"]["message"]
    deadline = time.monotonic() + 30  # the closed streams leave the router's count
    while (r := _post(server, "/v1/completions", {"model": MODEL, "prompt": "and now?", "max_tokens": 2})).status_code == 429:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_client_disconnect_frees_blocks_on_both_workers(server):
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Write a very long story about a lighthouse keeper.", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 60
    while True:
        workers = httpx.get(f"{server}/health", timeout=10).json()["workers"]
        busy = {n: w for n, w in workers.items() if w.get("running") or w.get("waiting") or w.get("kv_usage")}
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not busy, busy
    assert set(workers) == {"prefill-0", "decode-0"}


def test_metrics_and_request_ids(server, client):
    client.completions.create(model=MODEL, prompt="Metrics, please:", max_tokens=4, temperature=0)
    router = httpx.get(f"{server}/metrics", timeout=10).text  # no API key needed
    for name in ("kvrelay_router_decisions_total", "kvrelay_time_to_first_token_seconds_bucket",
                 "kvrelay_worker_up", 'kvrelay_requests_total{status="ok"}'):
        assert name in router, name
    assert 'policy="kv_aware",worker="prefill-0"' in router
    # Every worker serves its own endpoint; the router lists them all for Prometheus.
    groups = httpx.get(f"{server}/metrics/targets", timeout=10).json()
    targets = [t for g in groups for t in g["targets"]]
    assert len(targets) == 3, groups  # the router, prefill-0, decode-0
    workers = {}
    for t in targets:
        text = httpx.get(f"http://{t}/metrics", timeout=10).text
        for role in ("prefill", "decode"):
            if f'role="{role}",worker="{role}-0"' in text:
                workers[role] = text
    assert set(workers) == {"prefill", "decode"}
    computed = [line for line in workers["prefill"].splitlines()
                if line.startswith('kvrelay_prefill_computed_tokens_total{role="prefill"')]
    assert float(computed[0].rsplit(" ", 1)[1]) > 0
    assert "kvrelay_kv_transfer_seconds_count" in workers["prefill"]
    assert "kvrelay_kv_cache_usage_ratio" in workers["decode"]
    r = httpx.get(f"{server}/v1/models", headers={"authorization": f"Bearer {KEY}", "x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"


def test_kv_compression_field_on_both_endpoints(server, client, tokenizer):
    """A request picks its KV payload preset; an unknown one is a 400 naming the presets."""
    from cluster.compression import PRESETS

    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})):
        r = _post(server, path, {**body, "kv_compression": "ultra"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "kv_compression" and all(p in err["message"] for p in PRESETS), err
        r = _post(server, path, {**body, "kv_compression": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_compression"
    # Through the official client (extra_body), on a prompt long enough to be sparsified.
    messages = [{"role": "user", "content": "Summarize in one line: " + "The cluster ships KV between pools. " * 40}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"kv_compression": "balanced"})
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    groups = httpx.get(f"{server}/metrics/targets", timeout=10).json()
    scraped = "".join(httpx.get(f"http://{t}/metrics", timeout=10).text for g in groups for t in g["targets"])
    sent = [line for line in scraped.splitlines()
            if line.startswith("kvrelay_kv_transfer_bytes_total") and 'preset="balanced"' in line and 'role="prefill"' in line]
    assert sent and float(sent[0].rsplit(" ", 1)[1]) > 0


def test_fuzz_completions_and_chat_against_the_served_schema(server):
    """schemathesis (property-based, from the served OpenAPI document) on both
    endpoints, 150 examples each: never a 5xx, every error in OpenAI's envelope, and
    the server healthy afterwards. Half the examples name the served model (with few
    tokens to generate), so the fuzz reaches the workers, not only validation."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    headers = {"authorization": f"Bearer {KEY}"}
    failures: list[str] = []
    seen: dict[int, int] = {}

    for path in ("/v1/completions", "/v1/chat/completions"):
        @given(case=schema[path]["POST"].as_strategy())
        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            body = case.body
            if isinstance(body, dict) and len(repr(body)) % 2 == 0:
                body["model"] = MODEL
            if isinstance(body, dict) and body.get("model") == MODEL:  # set above, or drawn by the fuzzer
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                        body[key] = max(min(body[key], 4), -1)
                if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:  # absent or null
                    body["max_tokens"] = 4  # a chat's default is the whole context: minutes on a CPU
            response = case.call(base_url=server, headers=headers, timeout=120)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{path} {response.status_code}: {response.text[:300]} for {body!r}"[:600])
            elif response.status_code >= 400:
                err = response.json().get("error")
                if not (isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)):
                    failures.append(f"{path} {response.status_code} not in OpenAI's envelope: {response.text[:300]}")

        run()
    assert not failures, "\n".join(failures[:10])
    assert sum(seen.values()) >= 300 and any(200 <= code < 300 for code in seen), seen
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "Still alive?", "max_tokens": 2})
    assert r.status_code == 200
