"""The OpenAI-compatible HTTP API (FastAPI). Ray Serve mounts this app as the ingress
(router/serve_app.py); the handlers reach the RouterService installed in this module (`install`).

Every response carries an ``x-request-id`` (set by Ray Serve); every error is OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

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
from cluster.cluster import NoWorkerError
from cluster.worker_api import CapacityError, WorkerDiedError
from router import errors
from router.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatResponseMessage, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, ModelCard,
    ModelList, Usage, chat_completion_id, chat_logprobs, completion_id, completion_logprobs, now,
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


@app.middleware("http")
async def _request_id_auth_and_count(request: Request, call_next):
    request.state.arrival = time.monotonic()
    request_id = _request_id(request)
    request.state.request_id = request_id
    service: RouterService | None = _current.get("service")
    counted = service is not None and request.method == "POST" and request.url.path in _COUNTED_PATHS
    key = None if service is None else (service.config.router.api_key or os.environ.get("KVRELAY_API_KEY"))
    if key and request.url.path.startswith("/v1/"):
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
    (413; an undeclared one is measured when read, see _parse)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > s.config.router.max_body_bytes:
        return errors.payload_too_large(int(declared), s.config.router.max_body_bytes)
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
        } if w.health else {})}
        for ws in states.values() for w in ws
    }
    ok = s.ready and bool(states) and all(any(w.up for w in ws) for ws in states.values())
    body = {"status": "ok" if ok else "unavailable", "workers": workers,
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
    if s.inflight >= cfg.max_inflight:
        raise errors.rate_limited(1, f"too many requests in flight ({s.inflight}); try again shortly")
    key = _api_key_of(request)
    if cfg.max_inflight_per_key is not None and s.inflight_by_key.get(key, 0) >= cfg.max_inflight_per_key:
        raise errors.rate_limited(1, f"too many requests in flight for this API key ({cfg.max_inflight_per_key}); "
                                     "try again shortly")
    request.state.api_key = key


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


@app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
async def completions(request: Request):
    s = _service(request)
    req: CompletionRequest = await _parse(request, CompletionRequest)
    _admit(s, request, req.model, req.n)
    prompt = list(req.prompt) if isinstance(req.prompt, list) else s.tokenizer.encode(req.prompt, add_special_tokens=True)
    _check_prompt(s, prompt, req.max_tokens, chat=False)
    params = [req.to_sampling_params(choice_index=i) for i in range(req.n)]
    return await _respond(s, request, req, prompt, params, chat=False)


@app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    s = _service(request)
    req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    _admit(s, request, req.model, req.n)
    prompt = s.tokenizer.apply_chat_template(req.template_messages())
    _check_prompt(s, prompt, req.requested_max_tokens, chat=True)
    room = s.max_model_len - len(prompt)
    params = [req.to_sampling_params(default_max_tokens=room, choice_index=i) for i in range(req.n)]
    return await _respond(s, request, req, prompt, params, chat=True)


# ---- response building --------------------------------------------------------------------


def _token_texts(s: RouterService, ids: list[int]) -> list[str]:
    return [s.tokenizer.decode([t]) for t in ids]


def _logprobs(s: RouterService, ev: ChoiceEvent, chat: bool, offset: int = 0):
    if not ev.logprobs:
        return None
    tokens = _token_texts(s, [lp.token_id for lp in ev.logprobs])
    lps = [lp.logprob for lp in ev.logprobs]
    top = [[(s.tokenizer.decode([t]), v) for t, v in lp.top] for lp in ev.logprobs]
    return chat_logprobs(tokens, lps, top) if chat else completion_logprobs(tokens, lps, top, offset)


async def _respond(s: RouterService, request: Request, req, prompt: list[int], params, chat: bool):
    try:
        s.config.transfer.compression.resolve(req.kv_compression)
    except ValueError as e:
        raise errors.invalid_request(str(e), "kv_compression") from None
    result = RequestResult(prompt_tokens=len(prompt), arrival=getattr(request.state, "arrival", time.monotonic()))
    stream = s.run(prompt, params, req.stop_strings, result, compression=req.kv_compression)
    key = getattr(request.state, "api_key", "")
    s.enter(key)
    if req.stream:
        request.state.streaming = True
        return StreamingResponse(_sse(s, req, stream, result, chat, key), media_type="text/event-stream")
    try:
        texts: dict[int, list[str]] = {i: [] for i in range(len(params))}
        reasons: dict[int, str | None] = {}
        events: dict[int, list[ChoiceEvent]] = {i: [] for i in range(len(params))}
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
    usage = Usage.of(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
    if chat:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content="".join(texts[i])), finish_reason=reasons.get(i),
                              logprobs=_merged_logprobs(s, events[i], True)) for i in texts]
        return JSONResponse(ChatCompletionResponse(model=s.model_id, choices=choices, usage=usage).model_dump())
    choices = [CompletionChoice(index=i, text="".join(texts[i]), finish_reason=reasons.get(i),
                                logprobs=_merged_logprobs(s, events[i], False)) for i in texts]
    return JSONResponse(CompletionResponse(model=s.model_id, choices=choices, usage=usage).model_dump())


def _merged_logprobs(s: RouterService, events: list[ChoiceEvent], chat: bool):
    merged = ChoiceEvent(0, "", [], [lp for ev in events for lp in ev.logprobs])
    return _logprobs(s, merged, chat)


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


async def _sse(s: RouterService, req, stream: AsyncIterator[ChoiceEvent], result: RequestResult, chat: bool, key: str):
    rid = chat_completion_id() if chat else completion_id()
    created = now()
    usage_kw: dict[str, Any] = {"usage": None} if req.include_usage else {}
    status = "ok"
    try:
        if chat:
            first = ChatCompletionChunk(id=rid, created=created, model=s.model_id, **usage_kw, choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(req.n)])
            yield f"data: {first.model_dump_json()}\n\n"
        offsets: dict[int, int] = {}
        async for ev in stream:
            if chat:
                delta = ChatDelta(content=ev.text) if ev.text or not ev.finish_reason else ChatDelta()
                choice = ChatChunkChoice(index=ev.index, delta=delta, finish_reason=ev.finish_reason, logprobs=_logprobs(s, ev, True))
                chunk = ChatCompletionChunk(id=rid, created=created, model=s.model_id, choices=[choice], **usage_kw)
            else:
                lp = _logprobs(s, ev, False, offsets.get(ev.index, 0))
                offsets[ev.index] = offsets.get(ev.index, 0) + len(ev.text)
                choice = CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason, logprobs=lp)
                chunk = CompletionChunk(id=rid, created=created, model=s.model_id, choices=[choice], **usage_kw)
            yield f"data: {chunk.model_dump_json()}\n\n"
        if req.include_usage:
            usage = Usage.of(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
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
