"""An async load generator for OpenAI-compatible servers (httpx, streaming SSE).

A run is a list of *sessions*. A session starts at an offset (seconds from the run's
start: Poisson arrivals, a replayed trace's timestamps, ...) and issues its turns one
after another; the next turn may depend on the previous answers (multi-turn chat puts
the model's reply into the history). A single request is a session of one turn.

    records = await run_load(base_url, model, sessions, max_requests=40, duration_s=120,
                             request_timeout_s=120)
    summary = summarize(records, SLO(ttft_s=2.0, tpot_s=0.25))

Every request streams (``stream: true`` with ``stream_options.include_usage``). At the
client we record, per request:

* TTFT: send -> first chunk carrying non-empty content (chat ``delta.content``,
  completions ``text``);
* ITL: the gaps between consecutive content chunks after the first (one chunk usually
  carries one token; a chunk may carry several when the server's detokenizer held text
  back, e.g. half a UTF-8 character);
* end-to-end latency: send -> ``[DONE]``;
* output / prompt / cached tokens: from the final usage chunk (``completion_tokens``,
  ``prompt_tokens``, ``prompt_tokens_details.cached_tokens``);
* TPOT: (end-to-end - TTFT) / (output tokens - 1), for requests with >= 2 output tokens.

Arrival times are open-loop: a session starts at its offset whatever the server is
doing. Every request has a deadline (``request_timeout_s``); the run issues at most
``max_requests`` requests and none after ``duration_s``; requests still running
``drain_s`` after that are cancelled and recorded as errors.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench.report import dist

# ---------------------------------------------------------------------------------------
# what to send
# ---------------------------------------------------------------------------------------


@dataclass
class RequestSpec:
    """One request: ``api`` is "chat" (/v1/chat/completions) or "completions"
    (/v1/completions); ``body`` is the JSON body without model/stream/stream_options."""

    api: str
    body: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # copied into the record (workload info)

    def __post_init__(self) -> None:
        if self.api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {self.api!r}")


# next turn from the records of the turns so far (None: the session is over)
NextTurn = Callable[[list["RequestRecord"]], "RequestSpec | None"]


@dataclass
class Session:
    """Turns issued one after another, starting ``start_s`` after the run starts.
    ``turns`` is a fixed list or a function of the previous turns' records."""

    name: str
    start_s: float
    turns: Sequence[RequestSpec] | NextTurn
    think_s: float = 0.0  # pause between a turn's end and the next turn
    stop_on_error: bool = True  # a conversation cannot go on without the last answer

    def next_turn(self, history: list[RequestRecord]) -> RequestSpec | None:
        if callable(self.turns):
            return self.turns(history)
        return self.turns[len(history)] if len(history) < len(self.turns) else None


def poisson_arrivals(n: int, rate_per_s: float, seed: int = 0, start_s: float = 0.0) -> list[float]:
    """``n`` arrival offsets of a Poisson process of ``rate_per_s`` (the first at
    ``start_s``: a run should not begin with an idle gap)."""
    if rate_per_s <= 0:
        raise ValueError("rate_per_s must be > 0")
    rng = random.Random(seed)
    t, out = start_s, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def trace_arrivals(timestamps_ms: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """Offsets (s) from trace timestamps (ms), relative to the first, times
    ``time_scale`` (0.1 replays ten times faster)."""
    if not timestamps_ms:
        return []
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    t0 = min(timestamps_ms)
    return [(t - t0) / 1000.0 * time_scale for t in timestamps_ms]


# ---------------------------------------------------------------------------------------
# what came back
# ---------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    request_id: str
    session: str
    turn: int
    api: str
    scheduled_s: float  # when it was due (offset from the run's start)
    sent_s: float  # when it was sent
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    content_chunks: int = 0
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self, keep_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        if not keep_text:
            d["text_chars"] = len(d.pop("text"))
        return d


def _content(obj: dict[str, Any], api: str) -> tuple[str, str | None]:
    choices = obj.get("choices") or []
    if not choices:
        return "", None
    c = choices[0]
    if api == "chat":
        text = (c.get("delta") or {}).get("content") or ""
    else:
        text = c.get("text") or ""
    return text, c.get("finish_reason")


async def stream_request(
    client: httpx.AsyncClient, base_url: str, model: str, spec: RequestSpec, record: RequestRecord, timeout_s: float
) -> RequestRecord:
    """Send one streaming request and fill ``record`` (times relative to the send)."""
    path = "/v1/chat/completions" if spec.api == "chat" else "/v1/completions"
    body = {**spec.body, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last: float | None = None
    parts: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", base_url.rstrip("/") + path, json=body,
                                     headers={"x-request-id": record.request_id}) as resp:
                record.status = resp.status_code
                if resp.status_code != 200:
                    raw = (await resp.aread()).decode("utf-8", "replace")
                    try:
                        msg = json.loads(raw)["error"]["message"]
                    except Exception:
                        msg = raw[:300]
                    record.error = f"HTTP {resp.status_code}: {msg}"
                    return record
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:  # in-band error after the stream started
                        record.error = f"stream error: {obj['error'].get('message')}"
                        continue
                    now = time.perf_counter()
                    text, reason = _content(obj, spec.api)
                    if text:
                        if last is None:
                            record.ttft_s = now - t0
                        else:
                            record.itl_s.append(now - last)
                        last = now
                        record.content_chunks += 1
                        parts.append(text)
                    if reason:
                        record.finish_reason = reason
                    usage = obj.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = usage.get("completion_tokens")
                        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                record.e2e_s = time.perf_counter() - t0
                if record.error is None and not done:
                    record.error = "stream ended without [DONE]"
                elif record.error is None and record.output_tokens is None:
                    record.error = "no usage chunk"
                elif record.error is None and record.ttft_s is None and record.output_tokens:
                    record.error = "tokens generated but no content streamed"
                record.ok = record.error is None
    except TimeoutError:
        record.error = f"timeout after {timeout_s:.0f}s"
    except asyncio.CancelledError:
        record.error = "cancelled at the end of the run"
        raise
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.text = "".join(parts)
    return record


# ---------------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------------


async def run_load(
    base_url: str,
    model: str,
    sessions: Sequence[Session],
    *,
    max_requests: int = 1000,
    duration_s: float = 600.0,
    request_timeout_s: float = 120.0,
    drain_s: float | None = None,
    max_inflight: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[RequestRecord], dict[str, float]]:
    """Run ``sessions`` against ``base_url``; returns (records in send order, timing).

    At most ``max_requests`` requests are sent, none later than ``duration_s`` after the
    start; whatever still runs ``drain_s`` (default ``request_timeout_s``) after that
    is cancelled. ``max_inflight`` (default: none) caps concurrent requests; a request
    over the cap waits, which makes the arrivals closed-loop: the records keep the due
    time (``scheduled_s``) next to the send time (``sent_s``)."""
    if max_requests < 1 or duration_s <= 0 or request_timeout_s <= 0:
        raise ValueError("max_requests >= 1, duration_s > 0 and request_timeout_s > 0 are required")
    drain_s = request_timeout_s if drain_s is None else drain_s
    records: list[RequestRecord] = []
    budget = {"left": max_requests}
    sem = asyncio.Semaphore(max_inflight) if max_inflight else None
    limits = httpx.Limits(max_connections=max(len(sessions), 8) + 8, max_keepalive_connections=32)
    timeout = httpx.Timeout(connect=30.0, read=request_timeout_s, write=30.0, pool=request_timeout_s)
    t_start = time.perf_counter()
    seq = iter(range(1 << 30))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one_session(s: Session) -> None:
            history: list[RequestRecord] = []
            due = s.start_s
            while True:
                delay = due - (time.perf_counter() - t_start)
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.perf_counter() - t_start > duration_s or budget["left"] <= 0:
                    return
                spec = s.next_turn(history)
                if spec is None:
                    return
                budget["left"] -= 1
                if sem is not None:
                    await sem.acquire()
                rec = RequestRecord(
                    request_id=f"bench-{next(seq):05d}", session=s.name, turn=len(history), api=spec.api,
                    scheduled_s=due, sent_s=time.perf_counter() - t_start, meta=dict(spec.meta),
                )
                records.append(rec)
                try:
                    await stream_request(client, base_url, model, spec, rec, request_timeout_s)
                finally:
                    if sem is not None:
                        sem.release()
                if progress is not None:
                    progress(f"{rec.request_id} {s.name}#{rec.turn}: "
                             + (f"ttft {rec.ttft_s:.2f}s e2e {rec.e2e_s:.2f}s out {rec.output_tokens} cached {rec.cached_tokens}"
                                if rec.ok else f"ERROR {rec.error}"))
                history.append(rec)
                if not rec.ok and s.stop_on_error:
                    return
                due = (time.perf_counter() - t_start) + s.think_s

        tasks = [asyncio.create_task(one_session(s)) for s in sessions]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + drain_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    t_end = time.perf_counter()
    for r in records:  # cancelled mid-stream: never filled
        if not r.ok and r.error is None:
            r.error = "cancelled at the end of the run"
    records.sort(key=lambda r: r.sent_s)
    return records, {"wall_s": t_end - t_start}


def run_load_sync(*args, **kwargs):
    return asyncio.run(run_load(*args, **kwargs))


# ---------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLO:
    """A request is *good* when it succeeded, its TTFT <= ``ttft_s`` and its TPOT <=
    ``tpot_s`` (a one-token answer has no TPOT and is judged on TTFT)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.25

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s > self.ttft_s:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot <= self.tpot_s


def summarize(records: Sequence[RequestRecord], slo: SLO, wall_s: float | None = None) -> dict[str, Any]:
    """Aggregate a run. Throughputs are over the span from the first send to the last
    completion (``wall_s`` if given and no record). Percentiles are over requests (TTFT,
    TPOT, end-to-end) and over inter-chunk gaps of all requests pooled (ITL)."""
    ok = [r for r in records if r.ok]
    span = None
    if records:
        start = min(r.sent_s for r in records)
        end = max(r.sent_s + (r.e2e_s or 0.0) for r in records)
        span = max(end - start, 1e-9)
    span = span or wall_s
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    good = [r for r in ok if slo.met(r)]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "?").split(":")[0][:60]
            errors[key] = errors.get(key, 0) + 1
    lags = [r.sent_s - r.scheduled_s for r in records]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "span_s": span,
        "ttft_s": dist([r.ttft_s for r in ok]),
        "tpot_s": dist([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": dist([g for r in ok for g in r.itl_s]),
        "e2e_s": dist([r.e2e_s for r in ok]),
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "cached_tokens_reported": cached,
        "cached_share": cached / prompt_tokens if prompt_tokens else None,
        "output_tok_per_s": out_tokens / span if span else None,
        "requests_per_s": len(ok) / span if span else None,
        "slo": asdict(slo),
        "good": len(good),
        "slo_attainment": len(good) / len(records) if records else None,
        "goodput_req_per_s": len(good) / span if span else None,
        "max_send_lag_s": max(lags) if lags else None,
    }


def format_summary(name: str, s: dict[str, Any]) -> str:
    def ms(d: dict, k: str) -> str:
        v = d.get(k)
        return "-" if v is None else f"{v * 1000:.0f}"

    return (
        f"{name}: {s['ok']}/{s['requests']} ok, TTFT p50/p90/p99 {ms(s['ttft_s'], 'p50')}/{ms(s['ttft_s'], 'p90')}/"
        f"{ms(s['ttft_s'], 'p99')} ms, TPOT p50 {ms(s['tpot_s'], 'p50')} ms, ITL p50/p99 {ms(s['itl_s'], 'p50')}/"
        f"{ms(s['itl_s'], 'p99')} ms, {s['output_tok_per_s'] or 0:.1f} out tok/s, goodput {s['goodput_req_per_s'] or 0:.2f} req/s "
        f"({s['good']}/{s['requests']} in SLO), cached {s['cached_tokens_reported']}/{s['prompt_tokens']} prompt tokens"
    )


# ---------------------------------------------------------------------------------------
# Prometheus text (the server's /metrics)
# ---------------------------------------------------------------------------------------


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line of the Prometheus text format."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels_s, _, value_s = rest.rpartition("}")
            labels = {}
            for part in _split_labels(labels_s):
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"').replace('\\"', '"').replace("\\\\", "\\")
        else:
            name, _, value_s = line.partition(" ")
            labels = {}
        try:
            value = float(value_s.strip().split()[0])
        except (ValueError, IndexError):
            continue
        out.append((name.strip(), labels, value))
    return out


def _split_labels(s: str) -> list[str]:
    parts, cur, quoted, esc = [], [], False, False
    for ch in s:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


async def scrape(base_url: str, timeout_s: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
    """Every kvrelay process's samples: the router lists them (itself included) at
    /metrics/targets, as it does for Prometheus."""
    async with httpx.AsyncClient(timeout=timeout_s) as c:
        r = await c.get(base_url.rstrip("/") + "/metrics/targets")
        r.raise_for_status()
        samples = []
        for group in r.json():
            path = group.get("labels", {}).get("__metrics_path__", "/metrics")
            for target in group["targets"]:
                m = await c.get(f"http://{target}{path}")
                m.raise_for_status()
                samples += parse_prometheus(m.text)
        return samples


def counter_delta(before, after, name: str, group_by: str | None = None) -> dict[str, float]:
    """after - before of a counter family, summed over all series (key "total") and,
    with ``group_by``, per value of that label."""
    def sums(samples) -> dict[str, float]:
        d: dict[str, float] = {}
        for n, labels, v in samples:
            if n != name:
                continue
            d["total"] = d.get("total", 0.0) + v
            if group_by is not None:
                k = labels.get(group_by, "?")
                d[k] = d.get(k, 0.0) + v
        return d

    b, a = sums(before), sums(after)
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in sorted(set(a) | set(b))}
