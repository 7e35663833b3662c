"""The OpenAI-compatible HTTP API (FastAPI). Ray Serve mounts this app as the ingress
(router/serve_app.py); the handlers reach the RouterService installed in this module (`install`).

Every response carries an ``x-request-id`` (set by Ray Serve); every error is OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.admission import AdmissionRejected
from cluster.block_hash import cache_namespace
from cluster.cluster import NoWorkerError
from cluster.json_schema import schema_error
from cluster.worker_api import CapacityError, TokenLogprobs, WorkerDiedError
from router import errors
from router.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatResponseMessage, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse, Usage, chat_completion_id,
    chat_logprobs, completion_id, completion_logprobs, now,
)
from router.metrics import status_of_http
from router.service import ChoiceEvent, RequestResult, RouterService

log = logging.getLogger(__name__)
app = FastAPI(title="kvrelay", version="0.1.0")

# The service of this process. Ray Serve runs a deserialized copy of ``app``, so the
# replica cannot reach it through ``app.state``; the handlers (pickled by reference)
# see this module's globals instead.
_current: dict[str, RouterService] = {}


def install(service: RouterService) -> None:
    _current["service"] = service


def _service(request: Request | None = None) -> RouterService:
    s = _current.get("service")
    if s is None:
        raise errors.overloaded(5, "the router is starting; try again shortly")
    return s


def _error(e: errors.APIError, request_id: str) -> JSONResponse:  # noqa: ARG001 - see _request_id
    return JSONResponse(e.error_body(), status_code=e.status, headers=dict(e.headers or {}))


def _request_id(request: Request) -> str:
    """Ray Serve gives every request an id (the client's ``x-request-id`` if it sent
    one) and returns it in the ``x-request-id`` response header of every response;
    the router logs the same id."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # not under Serve
        rid = ""
    return rid or request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex[:16]}"


# Requests counted in kvrelay_requests_total{status}.
_COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions")
# Besides /v1/*, the API key guards vLLM's tokenizer endpoints.
_KEYED_PATHS = ("/tokenize", "/detokenize")


@app.middleware("http")
async def _request_id_auth_and_count(request: Request, call_next):
    request.state.arrival = time.monotonic()
    request_id = _request_id(request)
    request.state.request_id = request_id
    service: RouterService | None = _current.get("service")
    counted = service is not None and request.method == "POST" and request.url.path in _COUNTED_PATHS
    key = None if service is None else (service.config.router.api_key or os.environ.get("KVRELAY_API_KEY"))
    if key and (request.url.path.startswith("/v1/") or request.url.path in _KEYED_PATHS):
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if not given or not secrets.compare_digest(given, key):
            if counted:
                service.metrics.requests.labels("unauthorized").inc()
            return _error(errors.invalid_api_key(given), request_id)
    limited = _limits(service, request) if counted else None
    if limited is not None:
        service.metrics.requests.labels(status_of_http(limited.status)).inc()
        return _error(limited, request_id)
    try:
        response = await call_next(request)
    except BaseException:
        if counted:
            service.metrics.requests.labels("error").inc()
        raise
    # A stream counts itself when it ends (its status is known only then).
    if counted and not getattr(request.state, "streaming", False):
        status = getattr(request.state, "status", None)
        if status is None:
            status = "ok" if response.status_code < 400 else status_of_http(response.status_code)
        service.metrics.requests.labels(status).inc()
    return response


def _limits(s: RouterService, request: Request) -> errors.APIError | None:
    """Refusals that need no body parsed: a declared body over ``router.max_body_bytes``
    (413; an undeclared one is measured when read, see _parse), and the in-flight limits
    (429). Answered here, before the endpoint, they raise nothing: an exception raised
    by the endpoint comes back through this ``http`` middleware (Starlette's
    BaseHTTPMiddleware) as a reference cycle of frames and task-group state, ~18 KiB a
    request left for the cyclic gc; on a burst of 429s that was the router's memory
    residue per burst (bench/results/overload-bursts.md)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > s.config.router.max_body_bytes:
        return errors.payload_too_large(int(declared), s.config.router.max_body_bytes)
    return _over_inflight(s, request)


def _over_inflight(s: RouterService, request: Request) -> errors.APIError | None:
    cfg = s.config.router
    if s.inflight >= cfg.max_inflight:
        return errors.rate_limited(1, f"too many requests in flight ({s.inflight}); try again shortly")
    key = _api_key_of(request)
    if cfg.max_inflight_per_key is not None and s.inflight_by_key.get(key, 0) >= cfg.max_inflight_per_key:
        return errors.rate_limited(1, f"too many requests in flight for this API key ({cfg.max_inflight_per_key}); "
                                      "try again shortly")
    return None


def _api_key_of(request: Request) -> str:
    """The key a request is counted under for ``router.max_inflight_per_key`` (requests
    without one share the anonymous key "")."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


@app.exception_handler(errors.APIError)
async def _api_error(request: Request, e: errors.APIError) -> JSONResponse:
    return _error(e, request.state.request_id)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 404:
        err = errors.invalid_url(request.method, request.url.path)
    else:
        err = errors.APIError(e.status_code, str(e.detail))
    return _error(err, getattr(request.state, "request_id", "-"))


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error(errors.internal_error(), getattr(request.state, "request_id", "-"))


# ---- endpoints --------------------------------------------------------------------------


@app.get("/health")
async def health(request: Request) -> JSONResponse:
    s = _service(request)
    states = s.cluster.worker_states() if s.cluster else {}
    workers = {
        w.handle.name: {"up": w.up, "restarts": w.restarts, **({
            "running": w.health.running, "waiting": w.health.waiting, "kv_usage": round(w.health.kv_usage, 4),
            "pid": w.health.pid,
        } if w.health else {})}
        for ws in states.values() for w in ws
    }
    ok = s.ready and bool(states) and all(any(w.up for w in ws) for ws in states.values())
    body = {"status": "ok" if ok else "unavailable", "router_pid": os.getpid(), "workers": workers,
            "index": {r: {"mode": i.mode, "blocks": i.num_blocks} for r, i in s.indexes.items()}}
    return JSONResponse(body, status_code=200 if ok else 503)


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    """This router's metrics; each worker serves its own (see /metrics/targets)."""
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@app.get("/metrics/targets")
async def metrics_targets(request: Request) -> JSONResponse:
    """Prometheus HTTP service discovery (``http_sd_configs``): every kvrelay process
    to scrape. The router is listed at the address the caller used to reach it."""
    host = request.url.hostname or "127.0.0.1"
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    return JSONResponse(_service(request).metrics_targets(f"{host}:{port}"))


@app.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    s = _service(request)
    return JSONResponse(ModelList(data=[ModelCard(id=s.model_id, max_model_len=s.max_model_len)]).model_dump())


async def _parse(request: Request, cls):
    raw = await request.body()
    limit = _service(request).config.router.max_body_bytes
    if len(raw) > limit:
        raise errors.payload_too_large(len(raw), limit)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.invalid_json(str(e)) from None
    if not isinstance(body, dict):
        raise errors.invalid_json("the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise errors.from_validation_error(e) from None


def _admit(s: RouterService, request: Request, model: str, n: int) -> None:
    cfg = s.config.router
    if model != s.model_id:
        raise errors.model_not_found(model)
    if n > cfg.max_n:
        raise errors.invalid_request(f"n must be at most {cfg.max_n} on this server, got {n}", "n", "invalid_value")
    if not s.ready:
        raise errors.overloaded(5, "the cluster is starting; try again shortly")
    limited = _over_inflight(s, request)  # again: requests admitted since the middleware's check
    if limited is not None:
        raise limited
    request.state.api_key = _api_key_of(request)


def _namespace(s: RouterService, request: Request, req) -> str | None:
    """The request's prefix-cache namespace: its cache_salt, else its API key's (unless
    prefix_cache.namespace_per_key is off), else the shared default."""
    return cache_namespace(req.cache_salt, _api_key_of(request), s.config.prefix_cache.namespace_per_key)


def _check_prompt(s: RouterService, prompt: list[int], max_tokens: int | None, chat: bool) -> None:
    vocab = s.model_config.vocab_size
    if any(t >= vocab for t in prompt):
        raise errors.invalid_request(f"prompt has token ids outside the vocabulary [0, {vocab})", "prompt")
    if len(prompt) + (max_tokens or 1) > s.max_model_len:
        raise errors.context_length_exceeded(s.max_model_len, len(prompt), max_tokens, chat=chat)


def _body(cls) -> dict:
    """``openapi_extra`` of an endpoint that parses its own body (to answer in OpenAI's
    error envelope): the body's schema, so the served OpenAPI document says what the
    endpoint accepts."""
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi() -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for cls in (CompletionRequest, ChatCompletionRequest):
            js = cls.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[cls.__name__] = js
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def _check_sampling(s: RouterService, req) -> None:
    """What needs the model to check: bias token ids against the vocabulary, and that
    the response schema compiles."""
    vocab = s.model_config.vocab_size
    bad = [t for t in req.bias_token_ids if t >= vocab]
    if bad:
        raise errors.invalid_request(f"logit_bias has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "logit_bias")
    schema = req.json_schema
    if schema is not None:
        problem = schema_error(schema)
        if problem:
            raise errors.invalid_request(f"response_format: the JSON schema does not compile: {problem}", "response_format")


@app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
async def completions(request: Request):
    s = _service(request)
    req: CompletionRequest = await _parse(request, CompletionRequest)
    _admit(s, request, req.model, req.n)
    _check_sampling(s, req)
    prompts = [list(p) if isinstance(p, list) else s.tokenizer.encode(p, add_special_tokens=True) for p in req.prompt]
    for p in prompts:
        _check_prompt(s, p, req.max_tokens, chat=False)
    ns = _namespace(s, request, req)
    params = [req.to_sampling_params(choice_index=i, cache_namespace=ns) for i in range(req.n)]
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else s.tokenizer.decode(ids) for p, ids in zip(req.prompt, prompts)]
    return await _respond(s, request, req, prompts, params, chat=False, echo=echo)


@app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    s = _service(request)
    req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    _admit(s, request, req.model, req.n)
    _check_sampling(s, req)
    prompt = s.tokenizer.apply_chat_template(req.template_messages())
    _check_prompt(s, prompt, req.requested_max_tokens, chat=True)
    room = s.max_model_len - len(prompt)
    ns = _namespace(s, request, req)
    params = [req.to_sampling_params(default_max_tokens=room, choice_index=i, cache_namespace=ns) for i in range(req.n)]
    return await _respond(s, request, req, [prompt], params, chat=True)


def _check_model(s: RouterService, model: str | None) -> None:
    if model is not None and model != s.model_id:
        raise errors.model_not_found(model)


@app.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    """vLLM's shape: {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens", "token_strs"}."""
    s = _service(request)
    req: TokenizeRequest = await _parse(request, TokenizeRequest)
    _check_model(s, req.model)
    if req.prompt is not None:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = s.tokenizer.encode(req.prompt, add_special_tokens=special)
    else:
        ids = s.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages],
                                              add_generation_prompt=req.add_generation_prompt)
    strs = s.tokenizer.hf.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids, token_strs=strs).model_dump())


@app.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    """vLLM's shape: {"tokens": [ids]} -> {"prompt": text}."""
    s = _service(request)
    req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
    _check_model(s, req.model)
    vocab = s.model_config.vocab_size
    if any(t >= vocab for t in req.tokens):
        raise errors.invalid_request(f"tokens has ids outside the vocabulary [0, {vocab})", "tokens")
    return JSONResponse(DetokenizeResponse(prompt=s.tokenizer.decode(req.tokens)).model_dump())


# ---- response building --------------------------------------------------------------------


def _token_texts(s: RouterService, ids: list[int]) -> list[str]:
    return [s.tokenizer.decode([t]) for t in ids]


def _lp_lists(s: RouterService, ids: list[int], entries: list[TokenLogprobs | None]):
    """(token texts, logprobs, top alternatives) of a run of tokens; an entry None (the
    first prompt token) stays None."""
    lps = [e.logprob if e is not None else None for e in entries]
    top = [[(s.tokenizer.decode([t]), v) for t, v in e.top] if e is not None else None for e in entries]
    return _token_texts(s, ids), lps, top


def _logprobs(s: RouterService, ev: ChoiceEvent, chat: bool, offset: int = 0, echo: _Echo | None = None):
    """The logprobs of one event; with ``echo`` (a completion's first event) the
    prompt's tokens come first."""
    if not ev.logprobs and echo is None:
        return None
    tokens, lps, top = _lp_lists(s, [lp.token_id for lp in ev.logprobs], list(ev.logprobs))
    if chat:
        return chat_logprobs(tokens, lps, top)
    if echo is not None:
        entries = ev.prompt_logprobs or [None] * len(echo.ids)
        p_tokens, p_lps, p_top = _lp_lists(s, echo.ids, entries)
        tokens, lps, top = p_tokens + tokens, p_lps + lps, p_top + top
    return completion_logprobs(tokens, lps, top, offset)


@dataclasses.dataclass(frozen=True)
class _Echo:
    """A completion's prompt, returned before its text (``echo``)."""

    text: str
    ids: list[int]
    logprobs: bool  # also the prompt tokens' logprobs


class _Run:
    """Every prompt of one request, run at once: choice ``k * n + i`` is choice i of
    prompt k, and usage is the sum over the prompts."""

    def __init__(self, s: RouterService, req, prompts: list[list[int]], params, arrival: float) -> None:
        self.n = len(params)
        self.results = [RequestResult(prompt_tokens=len(p), arrival=arrival) for p in prompts]
        self.streams = [s.run(p, params, req.stop_strings, r, compression=req.kv_compression)
                        for p, r in zip(prompts, self.results)]

    @property
    def usage(self) -> Usage:
        rs = self.results
        return Usage.of(sum(r.prompt_tokens for r in rs), sum(r.completion_tokens for r in rs), sum(r.cached_tokens for r in rs))

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        if len(self.streams) == 1:
            stream = self.streams[0]
            try:
                async for ev in stream:
                    yield ev
            finally:
                await stream.aclose()  # a gone client: the request aborts on its workers now
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, stream: AsyncIterator[ChoiceEvent]) -> None:
            try:
                async for ev in stream:
                    await queue.put(dataclasses.replace(ev, index=k * self.n + ev.index))
                await queue.put(None)
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                await queue.put(e)

        tasks = [asyncio.create_task(pump(k, st)) for k, st in enumerate(self.streams)]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:  # a failed prompt or a gone client: stop the others (their workers abort)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _respond(s: RouterService, request: Request, req, prompts: list[list[int]], params, chat: bool,
                   echo: list[str] | None = None):
    try:
        s.config.transfer.compression.resolve(req.kv_compression)
    except ValueError as e:
        raise errors.invalid_request(str(e), "kv_compression") from None
    run = _Run(s, req, prompts, params, getattr(request.state, "arrival", time.monotonic()))
    n = len(params)
    echoes = None
    if echo is not None:
        want = req.logprobs is not None
        echoes = {k * n + i: _Echo(text, ids, want) for k, (text, ids) in enumerate(zip(echo, prompts)) for i in range(n)}
    stream = run.events()
    key = getattr(request.state, "api_key", "")
    s.enter(key)
    if req.stream:
        request.state.streaming = True
        return StreamingResponse(_sse(s, req, stream, run, chat, key, echoes), media_type="text/event-stream")
    num = len(prompts) * n
    try:
        texts: dict[int, list[str]] = {i: [] for i in range(num)}
        reasons: dict[int, str | None] = {}
        events: dict[int, list[ChoiceEvent]] = {i: [] for i in range(num)}
        async for ev in stream:
            texts[ev.index].append(ev.text)
            events[ev.index].append(ev)
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason
    except BaseException as e:
        request.state.status = _status(e)
        raise _as_api_error(e) from None
    finally:
        s.leave(key)
    usage = run.usage
    if chat:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content="".join(texts[i])), finish_reason=reasons.get(i),
                              logprobs=_merged_logprobs(s, events[i], True)) for i in texts]
        return JSONResponse(ChatCompletionResponse(model=s.model_id, choices=choices, usage=usage).model_dump())
    choices = []
    for i in texts:
        e = echoes[i] if echoes else None
        text = (e.text if e else "") + "".join(texts[i])
        lp = _merged_logprobs(s, events[i], False, e) if req.logprobs is not None else None
        choices.append(CompletionChoice(index=i, text=text, finish_reason=reasons.get(i), logprobs=lp))
    return JSONResponse(CompletionResponse(model=s.model_id, choices=choices, usage=usage).model_dump())


def _merged_logprobs(s: RouterService, events: list[ChoiceEvent], chat: bool, echo: _Echo | None = None):
    plp = next((ev.prompt_logprobs for ev in events if ev.prompt_logprobs is not None), None)
    merged = ChoiceEvent(0, "", [], [lp for ev in events for lp in ev.logprobs], None, plp)
    return _logprobs(s, merged, chat, echo=echo if echo is not None and echo.logprobs else None)


def _status(e: BaseException) -> str:
    """The ``status`` label of a request that failed while it ran."""
    if isinstance(e, errors.APIError):
        return status_of_http(e.status)
    if isinstance(e, (NoWorkerError, CapacityError, AdmissionRejected)):
        return "unavailable"
    if isinstance(e, WorkerDiedError):
        return "worker_died"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ValueError):
        return "bad_request"
    if isinstance(e, GeneratorExit) or type(e).__name__ == "CancelledError":
        return "cancelled"
    return "error"


def _as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, errors.APIError):
        return e
    if isinstance(e, AdmissionRejected):
        return errors.overloaded(e.retry_after_s, str(e))
    if isinstance(e, (NoWorkerError, CapacityError)):
        return errors.overloaded(2, str(e))
    if isinstance(e, ValueError):
        return errors.invalid_request(str(e))
    if isinstance(e, (WorkerDiedError, TimeoutError)):
        return errors.APIError(503, f"the request failed: {e}", errors.SERVER_ERROR, None, "worker_failed", {"Retry-After": "1"})
    if isinstance(e, Exception):
        log.exception("request failed")
        return errors.internal_error()
    return e  # cancellation: let it propagate


async def _sse(s: RouterService, req, stream: AsyncIterator[ChoiceEvent], run: _Run, chat: bool, key: str,
               echoes: dict[int, _Echo] | None = None):
    rid = chat_completion_id() if chat else completion_id()
    created = now()
    usage_kw: dict[str, Any] = {"usage": None} if req.include_usage else {}
    status = "ok"
    # Nothing is sent before a choice's first token: the role travels with it, as vLLM and
    # OpenAI send it, so the TTFT any client measures is the time to the first generated
    # token, not to an empty role chunk sent before the prefill ran.
    role_sent: set[int] = set()
    try:
        offsets: dict[int, int] = {}
        echoes = dict(echoes or {})  # popped at each choice's first event
        async for ev in stream:
            if chat:
                delta = ChatDelta(content=ev.text) if ev.text or not ev.finish_reason else ChatDelta()
                if ev.index not in role_sent:
                    role_sent.add(ev.index)
                    delta = ChatDelta(role="assistant", content=ev.text)
                choice = ChatChunkChoice(index=ev.index, delta=delta, finish_reason=ev.finish_reason, logprobs=_logprobs(s, ev, True))
                chunk = ChatCompletionChunk(id=rid, created=created, model=s.model_id, choices=[choice], **usage_kw)
            else:
                e = echoes.pop(ev.index, None)
                text = (e.text if e else "") + ev.text
                lp = None
                if req.logprobs is not None:
                    lp = _logprobs(s, ev, False, offsets.get(ev.index, 0), e if e is not None and e.logprobs else None)
                offsets[ev.index] = offsets.get(ev.index, 0) + len(text)
                choice = CompletionChoice(index=ev.index, text=text, finish_reason=ev.finish_reason, logprobs=lp)
                chunk = CompletionChunk(id=rid, created=created, model=s.model_id, choices=[choice], **usage_kw)
            yield f"data: {chunk.model_dump_json()}\n\n"
        if req.include_usage:
            usage = run.usage
            cls = ChatCompletionChunk if chat else CompletionChunk
            yield f"data: {cls(id=rid, created=created, model=s.model_id, choices=[], usage=usage).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except BaseException as e:
        status = _status(e)
        err = _as_api_error(e)
        if isinstance(err, errors.APIError):  # the stream has started: report in-band, then end it
            yield f"data: {json.dumps(err.error_body())}\n\n"
            yield "data: [DONE]\n\n"
        else:
            raise
    finally:
        s.leave(key)
        s.metrics.requests.labels(status).inc()


@app.get("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse("kvrelay: OpenAI-compatible API at /v1 (models, completions, chat/completions)\n")
