"""Compressed KV payloads: quality, wire bytes, latency and cost of every preset, side
by side in one run, on the real SmolLM2.

    python -m bench.compression            # full run: writes bench/results/compression.{md,json,png}
    python -m bench.compression --quick    # smoke run (2 items per length, 1 latency prompt); prints only
    python -m bench.compression --quick --out /tmp/cq       # ... and writes /tmp/cq.{md,json,png}
    python -m bench.compression --render bench/results/compression.json   # .md/.png again from a run

Presets (cluster/compression.py): none (dedup only, lossless), int8, fp8, int4,
balanced (SnapKV keep 0.5 + int4), max (SnapKV keep 0.25 + int4).

1. **Quality and bytes through the real path.** One ``kvrelay serve`` (bench/server.py):
   1 prefill + 1 decode worker, KV over UCX, the embedded SmolLM2-135M-Instruct, one
   torch thread per worker. A RULER-style needle-in-a-haystack set (bench/needle.py:
   essay-like haystack generated from a seed, one "special magic number" needle at a
   random depth, the question at the end), ``--lengths`` tokens (default ~1k and ~2k),
   ``--items`` per length, every preset on the SAME items, chat endpoint, greedy,
   ``max_tokens`` 32 (the model answers in a sentence of up to 26 tokens before the
   number: 16 cut it off). Correct = the 7-digit number appears in the output.
   Per preset: accuracy (Wilson 95%), the difference to ``none`` on the same prompts, items lost /
   gained, greedy agreement with ``none`` (identical output text), and from the workers'
   Prometheus counters (deltas over the part, per preset label): wire bytes vs the
   prompts' KV in 16 bits and in the cache dtype (float32), the mean kept fraction
   (histogram), fallbacks, failed transfers and decode-side recomputes.

   Which prompts share KV (dedup is always on: the decode worker never receives pages
   it holds exactly; compressed blocks are never reused). Default ("shared" prompts):
   an item's presets run one after another on the same prompt: the first request of a
   prompt is a sparse preset (computed in full; before 6a2980a a sparse request on a
   prompt the prefill worker had cached crashed its engine: see the report), the dense
   compressed presets follow (the prefill worker's prefix
   cache serves their prompt, the KV it ships is the same exact KV), and ``none`` comes
   last, so the decode worker never holds an exact page of the prompt when a preset
   runs and every request ships the whole prompt. The second sparse preset (max) gets
   a second id (its own prompt, first token on) followed by its own ``none`` (the
   "none, 2nd id" control row: its agreement with ``none`` is the noise floor that a
   different id alone causes). Every byte count is checked against the payload plan of
   a whole-prompt ship (cluster/kv_codec.py sizes, kv_selection.layer_budgets), so a
   dedup hit would show. ``--unique-prompts``: every (item, preset) request its own
   prompt, unique from the first token (6x the prefill work, no id-free comparison).
   The unique id sits in the system message, inside the first 16-token KV block.
2. **Latency per preset.** ``--latency-prompts`` needle prompts of ~1.5k tokens per
   preset (each request its own prompt), streaming, 16 output tokens (``ignore_eos``),
   one request at a time, presets interleaved prompt by prompt (the order rotates). At
   the client: TTFT, the first-to-second-token gap (where the rest of the transfer, the
   decode-side install/dequantize and the handoff show), and ITL after the second token.
3. **In-process costs** (``KVRelayCluster(use_ray=False)``, in-process transport, same
   engines): per preset, prompts of ``--cost-lengths`` tokens: the prefill worker's
   ``encode_seconds`` (selection + gather + quantize, all layers) as a share of its
   ``prefill_seconds``; per-layer encode/decode micro-times of each quantizer and of
   ``select_layer`` at n=1024 tokens, Hkv=3 (Hq=9), D=64, one torch thread; and
   decode-side capacity: how many ~1k (and ~2k) token prompts one decode engine with
   ``--capacity-blocks`` KV blocks of 16 tokens holds reserved at once per preset
   (``Engine.reserve`` with the decode worker's own ``_plan``, until CapacityError).

The "Reading" section of the report is written by hand; ``--render`` keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.report import cpu_name, pyplot, reading_section  # noqa: E402
from bench.needle import NeedleItem, needle_items, wilson  # noqa: E402
from bench.server import Server, log  # noqa: E402

PRESET_ORDER = ("none", "int8", "fp8", "int4", "balanced", "max")
MODEL_DIMS = {"layers": 30, "kv_heads": 3, "q_heads": 9, "head_dim": 64, "block_size": 16, "itemsize": 4}  # SmolLM2-135M, float32 cache

MODES = {
    "full": dict(items=8, lengths=[1024, 2048], latency_prompts=3, cost_lengths=[1024, 2048], micro_reps=30),
    "quick": dict(items=2, lengths=[1024, 2048], latency_prompts=1, cost_lengths=[1024], micro_reps=5),
}
SERVER_ENGINE = {"max_model_len": 4096, "kv_cache_memory_gb": 0.75}
SERVER_DEADLINES = {"prefill_s": 600, "reserve_s": 120, "transfer_s": 120, "token_s": 300, "startup_s": 600}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 items per length, 1 latency prompt, 1k costs; prints only")
    p.add_argument("--items", type=int, default=None, help="needle items per length (default 8; --quick 2)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="needle prompt lengths in tokens (default 1024 2048)")
    p.add_argument("--haystack", choices=["essay", "noise"], default="essay")
    p.add_argument("--presets", default=",".join(PRESET_ORDER), help="comma-separated; none is always included")
    p.add_argument("--unique-prompts", action="store_true",
                   help="every (item, preset) its own prompt from the first token (no prefill-cache reuse; 6x the prefill)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens of a needle answer (default 32)")
    p.add_argument("--concurrency", type=int, default=4, help="prompt chains in flight in part 1 (default 4)")
    p.add_argument("--latency-prompts", type=int, default=None, help="part 2 prompts per preset (default 3; --quick 1)")
    p.add_argument("--latency-tokens", type=int, default=1536, help="part 2 prompt length (default 1536)")
    p.add_argument("--latency-output", type=int, default=16, help="part 2 output tokens (default 16)")
    p.add_argument("--cost-lengths", type=int, nargs="+", default=None, help="part 3 prompt lengths (default 1024 2048)")
    p.add_argument("--capacity-blocks", type=int, default=512, help="part 3 decode KV pool, blocks of 16 tokens (default 512)")
    p.add_argument("--micro-reps", type=int, default=None, help="part 3 micro-benchmark repeats (default 30)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output stem (default bench/results/compression; --quick: none)")
    p.add_argument("--note", default=None, help="a sentence for the report (what else ran on the machine)")
    p.add_argument("--render", default=None, metavar="JSON", help="no run: write .md/.png again from a run's JSON")
    args = p.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    for k, v in mode.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.presets = [x for x in PRESET_ORDER if x == "none" or x in args.presets.split(",")]
    unknown = set(args.presets) - set(PRESET_ORDER)
    if unknown:
        p.error(f"unknown presets {sorted(unknown)}")
    args.parts = sorted({int(x) for x in args.parts.split(",")})
    if args.out is None and not args.quick:
        args.out = "bench/results/compression"
    return args


# ---------------------------------------------------------------------------------------
# payload sizes (what a whole-prompt ship of each preset must cost)
# ---------------------------------------------------------------------------------------


def settings_of(preset: str):
    from cluster.compression import PRESETS

    return PRESETS[preset]


def planned_budgets(settings, prompt_len: int, num_layers: int) -> list[int]:
    """Tokens per layer a whole-prompt ship keeps (the decode worker's _plan, region_start 0)."""
    from workers import kv_selection

    if not (settings.sparse and prompt_len >= max(settings.min_tokens, 1)):
        return [prompt_len] * num_layers
    sel = kv_selection.SelectionParams(settings.window, settings.sinks, settings.kernel, settings.pooling, settings.guard)
    forced = kv_selection.forced_count(prompt_len, 0, sel)
    return kv_selection.layer_budgets(prompt_len, None if settings.token_budget else settings.keep, num_layers,
                                      settings.budgets, token_budget=settings.token_budget, min_tokens=forced)


def planned_bytes(preset: str, prompt_len: int, dims: dict = MODEL_DIMS) -> dict[str, int]:
    """Wire bytes of shipping a whole prompt under ``preset`` (guard off), and the prompt's
    KV in the cache dtype and in 16 bits (the metrics' full / full_16bit)."""
    import torch

    from cluster import kv_codec

    s = settings_of(preset)
    L, H, D, bs, isz = dims["layers"], dims["kv_heads"], dims["head_dim"], dims["block_size"], dims["itemsize"]
    full = -(-prompt_len // bs) * bs * 2 * H * D * isz * L
    if s.lossless:
        wire = full
    else:
        q = kv_codec.get_quantizer(s.quantization, raw_dtype=torch.float32, group_size=s.group_size)
        wire = sum(kv_codec.layer_message_bytes(q, b, H, D) for b in planned_budgets(s, prompt_len, L))
    return {"wire": wire, "full": full, "full_16bit": full * 2 // isz}


# ---------------------------------------------------------------------------------------
# part 1: needle quality and bytes over HTTP
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    item: NeedleItem
    preset: str
    uid: str
    role: str  # the row it counts for: a preset name, or "none@2" (control) ...
    baseline: str  # role of the none request it is compared with


@dataclasses.dataclass
class Chain:
    steps: list[Step]


def build_chains(items_by_len: dict[int, list[NeedleItem]], presets: list[str], unique: bool) -> list[Chain]:
    uid = iter(range(100000, 1000000))
    chains = []
    sparse = [p for p in presets if settings_of(p).sparse]
    dense = [p for p in presets if p != "none" and not settings_of(p).sparse]
    for length in sorted(items_by_len):
        for item in items_by_len[length]:
            if unique:
                for p in presets:
                    chains.append(Chain([Step(item, p, str(next(uid)), p, "none")]))
                continue
            # chain 0: first sparse preset (fresh prefill), then the dense ones, then none
            head = sparse[:1]
            u = str(next(uid))
            chains.append(Chain([Step(item, p, u, p, "none") for p in head + dense + ["none"]]))
            for k, p in enumerate(sparse[1:], start=2):
                u = str(next(uid))
                ctrl = f"none@{k}"
                chains.append(Chain([Step(item, p, u, p, ctrl), Step(item, "none", u, ctrl, "none")]))
    return chains


async def chat_once(client, url: str, model: str, messages: list[dict], preset: str, max_tokens: int,
                    timeout_s: float) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "kv_compression": preset}
    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/v1/chat/completions", json=body, timeout=timeout_s)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:300]}", "seconds": dt}
        j = r.json()
        usage = j.get("usage") or {}
        return {"ok": True, "text": j["choices"][0]["message"]["content"] or "", "seconds": dt,
                "finish_reason": j["choices"][0].get("finish_reason"),
                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}


async def run_chains(url: str, model: str, chains: list[Chain], concurrency: int, max_tokens: int) -> list[dict]:
    import httpx

    queue: asyncio.Queue[Chain] = asyncio.Queue()
    for c in chains:
        queue.put_nowait(c)
    records: list[dict] = []
    total = sum(len(c.steps) for c in chains)
    async with httpx.AsyncClient() as client:

        async def worker() -> None:
            while True:
                try:
                    chain = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                for pos, s in enumerate(chain.steps):
                    r = await chat_once(client, url, model, s.item.messages(s.uid), s.preset, max_tokens, 900)
                    rec = {"length": s.item.length, "item": s.item.index, "preset": s.preset, "role": s.role,
                           "baseline": s.baseline, "uid": s.uid, "chain_pos": pos, "depth": round(s.item.depth, 3),
                           "number": s.item.number, **r}
                    rec["correct"] = bool(r["ok"] and s.item.correct(r["text"]))
                    records.append(rec)
                    log(f"  [{len(records)}/{total}] {s.item.length} #{s.item.index} {s.role:9s} "
                        + (f"{'ok ' if rec['correct'] else 'MISS'} {r['seconds']:5.1f}s cached {r.get('cached_tokens')} "
                           f"{r['text'][-40:]!r}" if r["ok"] else f"ERROR {r['error']}"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def metric_deltas(before, after) -> dict[str, Any]:
    from bench.loadgen import counter_delta

    out = {
        "wire": counter_delta(before, after, "kvrelay_kv_transfer_bytes_total", "preset"),
        "full": counter_delta(before, after, "kvrelay_kv_transfer_full_bytes_total", "preset"),
        "full_16bit": counter_delta(before, after, "kvrelay_kv_transfer_full_16bit_bytes_total", "preset"),
        "kept_sum": counter_delta(before, after, "kvrelay_kv_compression_kept_ratio_sum", "preset"),
        "kept_count": counter_delta(before, after, "kvrelay_kv_compression_kept_ratio_count", "preset"),
        "fallbacks": counter_delta(before, after, "kvrelay_kv_compression_fallbacks_total", "reason"),
        "transfer_failures": counter_delta(before, after, "kvrelay_kv_transfer_failures_total", "reason"),
        "kv_recomputes": counter_delta(before, after, "kvrelay_kv_recomputes_total", "role"),
        "prefix_hit_tokens": counter_delta(before, after, "kvrelay_prefix_cache_hit_tokens_total", "role"),
        "prefill_computed_tokens": counter_delta(before, after, "kvrelay_prefill_computed_tokens_total", "role"),
        "preemptions": counter_delta(before, after, "kvrelay_preemptions_total", "role"),
    }
    return out


def summarize_quality(records: list[dict], metrics: dict, presets: list[str]) -> list[dict]:
    by_key = {(r["length"], r["item"], r["role"]): r for r in records}
    roles = list(presets) + sorted({r["role"] for r in records if r["role"].startswith("none@")})
    lengths = sorted({r["length"] for r in records})
    rows = []
    for role in roles:
        recs = [r for r in records if r["role"] == role]
        if not recs:
            continue
        preset = recs[0]["preset"]
        row: dict[str, Any] = {"role": role, "preset": preset, "n": len(recs), "errors": sum(not r["ok"] for r in recs)}
        k = sum(r["correct"] for r in recs)
        row.update(correct=k, accuracy=k / len(recs), wilson=wilson(k, len(recs)))
        row["by_length"] = {}
        for L in lengths:
            sub = [r for r in recs if r["length"] == L]
            kk = sum(r["correct"] for r in sub)
            row["by_length"][str(L)] = {"n": len(sub), "correct": kk, "accuracy": kk / len(sub) if sub else None,
                                        "wilson": wilson(kk, len(sub))}
        # paired with the none request of the same prompt
        pairs = [(r, by_key.get((r["length"], r["item"], r["baseline"]))) for r in recs]
        pairs = [(r, b) for r, b in pairs if b is not None and b is not r]
        if pairs:
            row["paired_n"] = len(pairs)
            row["baseline"] = recs[0]["baseline"]
            row["delta_points"] = 100 * (sum(r["correct"] for r, _ in pairs) - sum(b["correct"] for _, b in pairs)) / len(pairs)
            row["lost"] = sum(b["correct"] and not r["correct"] for r, b in pairs)
            row["gained"] = sum(r["correct"] and not b["correct"] for r, b in pairs)
            ok = [(r, b) for r, b in pairs if r["ok"] and b["ok"]]
            row["agreement"] = sum(r["text"] == b["text"] for r, b in ok) / len(ok) if ok else None
        if role == preset:  # bytes per preset label (the "none" label also holds the controls)
            w, f, f16 = (metrics[x].get(preset, 0.0) for x in ("wire", "full", "full_16bit"))
            same = [r for r in records if r["preset"] == preset and r["ok"] and r.get("prompt_tokens")]
            plan = [planned_bytes(preset, r["prompt_tokens"]) for r in same]
            row.update(wire_bytes=w, full_bytes=f, full_16bit_bytes=f16,
                       x_vs_16bit=f16 / w if w else None, x_vs_float32=f / w if w else None,
                       wire_over_16bit=w / f16 if f16 else None,
                       planned_wire_bytes=sum(p["wire"] for p in plan), planned_full_16bit=sum(p["full_16bit"] for p in plan),
                       requests_counted=len(same))
            row["matches_plan"] = bool(plan) and abs(w - row["planned_wire_bytes"]) < 1 and abs(f16 - row["planned_full_16bit"]) < 1
            c = metrics["kept_count"].get(preset, 0.0)
            row["mean_kept"] = metrics["kept_sum"].get(preset, 0.0) / c if c else None
        rows.append(row)
    return rows


async def warm_up(url: str, model: str, tok, presets: list[str], seed: int) -> None:
    import httpx

    items = needle_items(tok, len(presets), 256, seed=seed + 99, haystack="essay")
    async with httpx.AsyncClient() as client:
        for i, (p, item) in enumerate(zip(presets, items)):
            r = await chat_once(client, url, model, item.messages(str(900000 + i)), p, 4, 300)
            if not r["ok"]:
                log(f"warm-up {p}: {r['error']}")


async def part_quality(url: str, model: str, tok, args) -> dict[str, Any]:
    from bench.loadgen import scrape

    items_by_len = {L: needle_items(tok, args.items, L, seed=args.seed, haystack=args.haystack) for L in args.lengths}
    chains = build_chains(items_by_len, args.presets, args.unique_prompts)
    log(f"part 1: {sum(len(c.steps) for c in chains)} requests in {len(chains)} prompt chains, "
        f"{args.items} items x {args.lengths} tokens, concurrency {args.concurrency}")
    before = await scrape(url)
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    records = await run_chains(url, model, chains, args.concurrency, args.max_tokens)
    wall = time.perf_counter() - t0
    after = await scrape(url)
    metrics = metric_deltas(before, after)
    rows = summarize_quality(records, metrics, args.presets)
    return {"records": records, "metrics": metrics, "rows": rows, "wall_s": wall, "loadavg_1m_start": round(load, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "items": {str(L): [{"index": it.index, "word": it.word, "number": it.number, "depth": round(it.depth, 3),
                                "prompt_tokens": it.prompt_tokens} for it in its] for L, its in items_by_len.items()}}


# ---------------------------------------------------------------------------------------
# part 2: latency per preset over HTTP (streaming)
# ---------------------------------------------------------------------------------------


async def part_latency(url: str, model: str, tok, args) -> dict[str, Any]:
    import httpx

    from bench.loadgen import RequestRecord, RequestSpec, stream_request

    n = args.latency_prompts
    items = needle_items(tok, n * len(args.presets), args.latency_tokens, seed=args.seed + 1, haystack=args.haystack)
    log(f"part 2: {n} prompt(s) of ~{args.latency_tokens} tokens per preset, {len(items)} requests, one at a time")
    recs = []
    uid = iter(range(200000, 300000))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0)) as client:
        for i in range(n):
            order = args.presets[i % len(args.presets):] + args.presets[: i % len(args.presets)]
            for j, p in enumerate(order):
                item = items[i * len(args.presets) + j]
                u = str(next(uid))
                body = {"messages": item.messages(u), "max_tokens": args.latency_output, "min_tokens": args.latency_output,
                        "ignore_eos": True, "temperature": 0.0, "kv_compression": p}
                rec = RequestRecord(request_id=f"lat-{u}", session=p, turn=0, api="chat", scheduled_s=0.0, sent_s=0.0)
                load = os.getloadavg()[0]
                await stream_request(client, url, model, RequestSpec("chat", body), rec, 600.0)
                d = rec.to_json()
                d.update(preset=p, prompt=i, loadavg_1m=round(load, 2))
                recs.append(d)
                if rec.ok:
                    log(f"  #{i} {p:8s}: TTFT {rec.ttft_s:.2f}s, 1st->2nd {rec.itl_s[0] * 1e3 if rec.itl_s else float('nan'):.0f} ms, "
                        f"ITL p50 {statistics.median(rec.itl_s[1:]) * 1e3 if len(rec.itl_s) > 1 else float('nan'):.0f} ms, "
                        f"{rec.output_tokens} tokens")
                else:
                    log(f"  #{i} {p:8s}: ERROR {rec.error}")
    rows = []
    for p in args.presets:
        ok = [r for r in recs if r["preset"] == p and r["ok"]]
        gaps = [g for r in ok for g in r["itl_s"][1:]]
        rows.append({
            "preset": p, "n": len([r for r in recs if r["preset"] == p]), "ok": len(ok),
            "prompt_tokens": statistics.median([r["prompt_tokens"] for r in ok]) if ok else None,
            "ttft_p50_s": statistics.median([r["ttft_s"] for r in ok]) if ok else None,
            "first_gap_p50_s": statistics.median([r["itl_s"][0] for r in ok if r["itl_s"]]) if ok else None,
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "itl_n": len(gaps),
        })
    base = next((r for r in rows if r["preset"] == "none"), None)
    for r in rows:
        for k in ("ttft_p50_s", "first_gap_p50_s", "itl_p50_s"):
            r[k.replace("_s", "_vs_none")] = (r[k] / base[k]) if base and base[k] and r[k] else None
    return {"records": recs, "rows": rows}


# ---------------------------------------------------------------------------------------
# part 3: in-process costs
# ---------------------------------------------------------------------------------------


class Running:
    """A cluster on its own event loop thread, driven from sync code (as the integration tests do)."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(cluster.start(), timeout=600)

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, prompt, params, request_id, compression):
        async def go():
            toks = []
            async for out in self.cluster.generate(prompt, params, request_id, compression=compression):
                toks += out.new_token_ids
            return toks

        return self.run(go())

    def close(self) -> None:
        try:
            self.run(self.cluster.shutdown(), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def micro_codecs(reps: int, n: int = 1024) -> dict[str, Any]:
    import torch

    from cluster import kv_codec
    from workers import kv_selection

    d = MODEL_DIMS
    H, D, Hq = d["kv_heads"], d["head_dim"], d["q_heads"]
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g)
    out = {"n": n, "kv_heads": H, "head_dim": D, "reps": reps, "torch_threads": torch.get_num_threads(), "quantizers": []}
    for name in kv_codec.QUANTIZERS:
        q = kv_codec.get_quantizer(name, raw_dtype=torch.float32, group_size=32)
        buf = kv_codec.encode_layer(q, 0, k, v)
        nb = buf.numel()
        kk, vv = kv_codec.decode_layer(q, buf, nb, 0, H, D, torch.float32, "cpu")
        err = max(float((kk - k).abs().max()), float((vv - v).abs().max()))
        out["quantizers"].append({
            "name": name, "bytes": nb, "x_vs_16bit": kv_codec.ratio_vs_16bit(q, n, H, D), "max_abs_err_randn": err,
            "encode_ms": _median_ms(lambda: kv_codec.encode_layer(q, 0, k, v), reps),
            "decode_ms": _median_ms(lambda: kv_codec.decode_layer(q, buf, nb, 0, H, D, torch.float32, "cpu"), reps),
        })
    qw = torch.randn(32, Hq, D, generator=g)
    sel = kv_selection.SelectionParams()
    out["select_layer"] = {"queries": 32, "q_heads": Hq, "budget": n // 2,
                           "ms": _median_ms(lambda: kv_selection.select_layer(qw, k, 0, n // 2, sel), reps)}
    gathered = {}
    idx = torch.sort(torch.randperm(n, generator=g)[: n // 2]).values

    def gather():
        gathered["k"] = k[idx]
        gathered["v"] = v[idx]

    out["gather_half_ms"] = _median_ms(gather, reps)
    return out


def capacity(dw, args) -> dict[str, Any]:
    """Reservations a decode engine of ``--capacity-blocks`` blocks holds at once, per preset."""
    from cluster.compression import CompressionSection
    from workers.engine import CapacityError, Engine
    from workers.sampling_params import SamplingParams

    cfg = dataclasses.replace(dw.engine.config, num_kv_blocks=args.capacity_blocks)
    eng = Engine(cfg, loaded=dw.engine.loaded)
    vocab = eng.model_config.vocab_size
    rng = random.Random(args.seed + 3)
    section = CompressionSection()
    params = SamplingParams(max_tokens=16, temperature=0.0)
    rows = []
    lengths = sorted({min(args.cost_lengths), max(args.cost_lengths)})
    for L in lengths:
        for p in args.presets:
            label, settings = section.resolve(p)
            held, slots = [], None
            while True:
                prompt = [rng.randrange(vocab) for _ in range(L)]
                rid = f"cap-{p}-{L}-{len(held)}"
                plan_box = {}

                def suffix_slots(start, region, prompt_len=L):
                    plan_box["plan"] = dw._plan(label, settings, prompt_len, start, region)
                    return plan_box["plan"].planned_slots

                try:
                    res = eng.reserve(rid, prompt, params, suffix_slots)
                except CapacityError:
                    break
                held.append(rid)
                slots = res.suffix_slots
                if len(held) > 10 * args.capacity_blocks:
                    raise RuntimeError("capacity loop does not end")
            for rid in held:
                eng.abort(rid)
            free = eng.block_manager.num_free_blocks
            plan = plan_box.get("plan")
            rows.append({"length": L, "preset": p, "requests": len(held), "planned_slots": slots,
                         "blocks_per_request": eng.block_manager.blocks_for(slots) if slots else None,
                         "mean_budget": statistics.mean(plan.budgets) if plan else None,
                         "max_budget": max(plan.budgets) if plan else None, "min_budget": min(plan.budgets) if plan else None,
                         "free_after_abort": free})
            if free != args.capacity_blocks:
                log(f"  capacity {p}: {free} of {args.capacity_blocks} blocks free after aborting the reservations")
    for r in rows:
        base = next(x for x in rows if x["length"] == r["length"] and x["preset"] == "none")
        r["vs_none"] = r["requests"] / base["requests"] if base["requests"] else None
    del eng
    return {"num_kv_blocks": args.capacity_blocks, "block_size": cfg.block_size, "rows": rows}


def part_costs(tok, args) -> dict[str, Any]:
    import torch

    from cluster.cluster import KVRelayCluster
    from cluster.config import ClusterConfig
    from workers.sampling_params import SamplingParams

    cfg = ClusterConfig.build({
        "engine": {"max_model_len": 4096, "kv_cache_memory_gb": 0.5},
        "pools": {"prefill_workers": 1, "decode_workers": 1, "threads_per_worker": 1},
        "transfer": {"transport": "inprocess"},
        "deadlines": {"prefill_s": 600, "transfer_s": 120, "token_s": 300, "reserve_s": 120},
        "metrics": {"enabled": False},
    })
    log("part 3: in-process cluster (1 prefill + 1 decode worker, in-process transport)")
    t0 = time.perf_counter()
    run = Running(KVRelayCluster(cfg, use_ray=False))
    log(f"  started in {time.perf_counter() - t0:.0f}s")
    out: dict[str, Any] = {}
    try:
        pw = run.cluster.prefill.workers[0].handle.target
        dw = run.cluster.decode.workers[0].handle.target
        spec = dw.engine.kv_cache.spec
        dims = {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                "block_size": spec.block_size, "itemsize": spec.dtype.itemsize}
        for key, val in dims.items():
            if MODEL_DIMS[key] != val:
                raise RuntimeError(f"model KV {key} is {val}, the bench assumes {MODEL_DIMS[key]} (MODEL_DIMS)")
        out["kv_spec"] = {**dims, "dtype": str(spec.dtype)}
        params = SamplingParams(max_tokens=2, temperature=0.0)
        uid = iter(range(300000, 400000))
        # warm-up: every preset once, short (first-call costs out of the timings)
        for p, it in zip(args.presets, needle_items(tok, len(args.presets), 256, seed=args.seed + 98, haystack="essay")):
            run.generate(tok.apply_chat_template(it.messages(str(next(uid)))), params, f"warm-{p}", p)
        recs = []
        for L in args.cost_lengths:
            items = needle_items(tok, len(args.presets), L, seed=args.seed + 2, haystack=args.haystack)
            for j, p in enumerate(args.presets):
                prompt = tok.apply_chat_template(items[j].messages(str(next(uid))))
                rid = f"cost-{p}-{L}"
                run.generate(prompt, params, rid, p)
                r = run.run(pw.prefill_log(rid))
                rec = {"length": L, "preset": p, "prompt_tokens": len(prompt), "prefill_s": r.prefill_seconds,
                       "encode_s": r.encode_seconds, "encode_share": r.encode_seconds / r.prefill_seconds,
                       "bytes_sent": r.bytes_sent, "full_bytes": r.full_bytes, "full_16bit": r.full_bytes_16bit,
                       "kept_fraction": r.kept_fraction, "min_mass": r.min_mass, "guard_raised_layers": r.guard_raised_layers,
                       "num_cached_tokens": r.num_cached_tokens, "planned_wire": planned_bytes(p, len(prompt), dims)["wire"]}
                recs.append(rec)
                log(f"  {L} {p:8s}: prefill {r.prefill_seconds:.2f}s, encode {r.encode_seconds * 1e3:.0f} ms "
                    f"({rec['encode_share'] * 100:.1f}%), {r.full_bytes_16bit / r.bytes_sent:.2f}x vs 16-bit, "
                    f"kept {r.kept_fraction:.2f}, min mass {r.min_mass:.3f}")
        out["encode"] = recs
        st = run.run(dw.stats())
        out["decode_stats"] = {k: st.get(k) for k in ("kv_recomputes", "compression_fallbacks")}
        torch.set_num_threads(1)
        log("  micro-benchmarks (one torch thread)")
        out["micro"] = micro_codecs(args.micro_reps)
        log("  decode-side capacity")
        out["capacity"] = capacity(dw, args)
    finally:
        run.close()
    return out


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------


def _pct(x, digits: int = 0) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _ms(x) -> str:
    return "–" if x is None else f"{x * 1e3:.0f}"


def _x(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}×"


def quality_table(q: dict) -> list[str]:
    rows = q["rows"]
    lengths = sorted({r["length"] for r in q["records"]})
    hdr = ["preset", "n"] + [f"acc ~{L // 1024}k" if L % 1024 == 0 else f"acc {L}" for L in lengths]
    hdr += ["accuracy (Wilson 95%)", "Δ vs none (pts)", "lost / gained", "same output as none",
            "16-bit ÷ wire (wire as % of 16-bit)", "float32 ÷ wire", "mean kept", "bytes = plan"]
    out = ["| " + " | ".join(hdr) + " |", "| --- |" + " ---: |" * (len(hdr) - 1)]
    for r in rows:
        name = r["role"] if r["role"] == r["preset"] else f"none, id {r['role'].split('@')[1]} (control)"
        cells = [name, str(r["n"])]
        for L in lengths:
            b = r["by_length"].get(str(L))
            cells.append("–" if not b or not b["n"] else f"{b['correct']}/{b['n']}")
        lo, hi = r["wilson"]
        cells.append(f"{r['accuracy'] * 100:.0f}% [{lo * 100:.0f}–{hi * 100:.0f}]")
        if "delta_points" in r:
            vs = "" if r["baseline"] == "none" else f" (vs none, id {r['baseline'].split('@')[1]})" if "@" in r["baseline"] else ""
            cells.append(f"{r['delta_points']:+.0f}{vs}".replace("-", "−"))
            cells.append(f"{r['lost']} / {r['gained']}")
            cells.append(_pct(r["agreement"]))
        else:
            cells += ["–", "–", "–"]
        if "wire_bytes" in r:
            cells.append(f"{r['x_vs_16bit']:.2f}× ({r['wire_over_16bit'] * 100:.1f}%)" if r["x_vs_16bit"] else "–")
            cells.append(_x(r["x_vs_float32"]))
            cells.append("–" if r["mean_kept"] is None else f"{r['mean_kept']:.3f}")
            cells.append("yes" if r["matches_plan"] else "**no**")
        else:
            cells += ["(in none)", "", "", ""]
        out.append("| " + " | ".join(cells) + " |")
    return out


def latency_table(lat: dict) -> list[str]:
    out = ["| preset | requests | prompt tokens | TTFT p50 s | vs none | 1st→2nd token p50 ms | vs none | ITL p50 ms (after the 2nd) | vs none | gaps |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in lat["rows"]:
        ttft = "–" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.2f}"
        out.append(f"| {r['preset']} | {r['ok']}/{r['n']} | {r['prompt_tokens'] or '–'} | {ttft} | "
                   f"{_x(r['ttft_p50_vs_none'])} | {_ms(r['first_gap_p50_s'])} | {_x(r['first_gap_p50_vs_none'])} | "
                   f"{_ms(r['itl_p50_s'])} | {_x(r['itl_p50_vs_none'])} | {r['itl_n']} |")
    return out


def encode_table(c: dict) -> list[str]:
    out = ["| prompt tokens | preset | prefill s | encode ms | encode / prefill | 16-bit ÷ wire | kept | min mass | bytes = plan |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in c["encode"]:
        out.append(f"| {r['prompt_tokens']} | {r['preset']} | {r['prefill_s']:.2f} | {r['encode_s'] * 1e3:.0f} | "
                   f"{r['encode_share'] * 100:.1f}% | {r['full_16bit'] / r['bytes_sent']:.2f}× | {r['kept_fraction']:.3f} | "
                   f"{r['min_mass']:.3f} | {'yes' if r['bytes_sent'] == r['planned_wire'] else '**no**'} |")
    return out


def micro_table(c: dict) -> list[str]:
    m = c["micro"]
    L = c["kv_spec"]["layers"]
    out = [f"| per layer, n={m['n']} tokens, Hkv={m['kv_heads']}, D={m['head_dim']} | message bytes | 16-bit ÷ message | encode ms | decode ms | "
           f"× {L} layers: encode + decode ms | max abs error (randn) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for q in m["quantizers"]:
        out.append(f"| {q['name']} | {q['bytes']:,} | {q['x_vs_16bit']:.2f}× | {q['encode_ms']:.3f} | {q['decode_ms']:.3f} | "
                   f"{(q['encode_ms'] + q['decode_ms']) * L:.1f} | {q['max_abs_err_randn']:.3g} |")
    s = m["select_layer"]
    out.append(f"| select_layer (SnapKV, {s['queries']} window queries × Hq={s['q_heads']}, keep {s['budget']}) | | | {s['ms']:.3f} | | "
               f"{s['ms'] * L:.1f} (encode side only) | |")
    out.append(f"| gather of the kept half (K and V) | | | {m['gather_half_ms']:.3f} | | {m['gather_half_ms'] * L:.1f} | |")
    return out


def capacity_table(c: dict) -> list[str]:
    cap = c["capacity"]
    out = [f"| prompt tokens | preset | planned slots per request | per-layer budget min / mean / max | blocks per request | "
           f"requests held in {cap['num_kv_blocks']} blocks | vs none |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in cap["rows"]:
        bud = "–" if r["mean_budget"] is None else f"{r['min_budget']} / {r['mean_budget']:.0f} / {r['max_budget']}"
        out.append(f"| {r['length']} | {r['preset']} | {r['planned_slots']} | {bud} | {r['blocks_per_request']} | {r['requests']} | "
                   f"{_x(r['vs_none'])} |")
    return out


def selection_share(c: dict) -> list[dict]:
    """Selection-only share of prefill time: select_layer micro-time x layers (scaled by
    n for other lengths, linear in P at a fixed window) over the 1k/2k prefill times."""
    m = c["micro"]
    L = c["kv_spec"]["layers"]
    out = []
    for r in c["encode"]:
        if r["preset"] != "none":
            continue
        sel_s = m["select_layer"]["ms"] / 1e3 * L * r["prompt_tokens"] / m["n"]
        out.append({"prompt_tokens": r["prompt_tokens"], "selection_s_est": sel_s, "prefill_s": r["prefill_s"],
                    "share": sel_s / r["prefill_s"]})
    return out


def write_md(res: dict, path: Path, png_name: str) -> list[str]:
    m, a = res["meta"], res["args"]
    lines = [
        "# Compressed KV payloads: quality, wire bytes, latency and cost per preset",
        "",
        f"Reproduce: `{m['command']}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| date | {m['date']} |",
        f"| machine | {m['cpu']}, {m['cpu_count']} logical CPUs (shared with other jobs: see the load average) |",
        f"| software | Python {m['python']}, torch {m['torch']}, git {m['git_commit']} |",
        "| model | SmolLM2-135M-Instruct (embedded GGUF, float32 KV cache), 30 layers, 9 query / 3 KV heads × 64 |",
        f"| server (parts 1, 2) | `kvrelay serve --prefill-workers 1 --decode-workers 1 --threads 1 "
        f"{' '.join('--set engine.' + k + '=' + str(v) for k, v in SERVER_ENGINE.items())}`: 1 prefill + 1 decode worker "
        "(Ray actors, one torch thread each), KV over UCX, layer-wise; presets per request (`kv_compression`) |",
        f"| presets | {', '.join(a['presets'])} (cluster/compression.py) |",
        f"| load average before / after | {m['loadavg_before']} / {m['loadavg_after']} |",
        f"| run time | {m['run_s']:.0f} s |",
    ]
    if m.get("note"):
        lines.append(f"| note | {m['note']} |")
    lines += ["", f"![bytes vs accuracy, capacity]({png_name})", ""]
    q = res.get("quality")
    if q:
        n_req = len(q["records"])
        lines += [
            "## 1. Needle in a haystack: accuracy and wire bytes (real path: HTTP → router → prefill worker → UCX → decode worker)",
            "",
            f"{a['items']} items per length × lengths {a['lengths']} tokens (chat-templated prompt; RULER niah_single wording, "
            f"{a['haystack']} haystack generated from seed {a['seed']}, needle depth uniform in 10–90%), every preset on the same items, "
            f"greedy, max_tokens {a['max_tokens']}; {n_req} requests, {a['concurrency']} prompt chains in flight, "
            f"{q['wall_s']:.0f} s (load average {q['loadavg_1m_start']} → {q['loadavg_1m_end']}). Correct: the needle's 7-digit number "
            "is in the answer (chance ≈ 0). *Δ vs none*: accuracy points against the `none` request of the same prompt "
            "(negative: the preset is worse; lost / gained: items right under none and wrong under the preset / the reverse). *Same output as none*: the answer text "
            "is identical. Bytes are the workers' Prometheus counter deltas over this part, per preset label "
            "(`kvrelay_kv_transfer_bytes_total` / `..._full_16bit_bytes_total` / `..._full_bytes_total`); *mean kept* from "
            "`kvrelay_kv_compression_kept_ratio`; *bytes = plan*: the wire bytes equal, to the byte, what shipping every request's "
            "whole prompt under the preset must cost (kv_codec sizes, kv_selection.layer_budgets), i.e. nothing was deduplicated.",
            "",
        ]
        if a["unique_prompts"]:
            lines += ["Prompts: every (item, preset) request is its own prompt (a unique id in the first KV block).", ""]
        else:
            lines += [
                "Prompts: per item, the presets run one after another on one prompt (`balanced` first: a sparse preset needs "
                "the prompt's window queries, and before 6a2980a a sparse request whose prompt the prefill worker already "
                "cached killed its engine thread, `ValueError: q_window has 5 queries, need min(window, P) = 32` in "
                "kv_selection.select_layer; since then such a request recomputes its window); then int8, fp8, int4, served "
                "from the prefill worker's prefix "
                "cache; `none` last, so the decode worker held no exact page of the prompt for any preset). `max` runs on a second "
                "prompt (another id in the first KV block), followed by its own `none`: the control row. `max` is compared with "
                "that none; the control row's agreement with the first none is what a different id alone changes.",
                "",
            ]
        lines += quality_table(q)
        mt = q["metrics"]
        fb = {k: v for k, v in mt["fallbacks"].items() if k != "total" and v}
        tf = {k: v for k, v in mt["transfer_failures"].items() if k != "total" and v}
        none_row = next((r for r in q["rows"] if r["role"] == "none"), None)
        lines += [
            "",
            f"- Fallbacks (`kvrelay_kv_compression_fallbacks_total`): {fb or 'none'}; failed transfers: {tf or 'none'}; "
            f"decode-side recomputes: {mt['kv_recomputes'].get('total', 0):.0f}; preemptions: {mt['preemptions'].get('total', 0):.0f}.",
            f"- Prefix-cache hits during this part: prefill worker {mt['prefix_hit_tokens'].get('prefill', 0):.0f} tokens, "
            f"decode worker {mt['prefix_hit_tokens'].get('decode', 0):.0f} tokens; prefill tokens computed "
            f"{mt['prefill_computed_tokens'].get('prefill', 0):.0f}.",
            f"- Errors: {sum(not r['ok'] for r in q['records'])} of {n_req} requests.",
        ]
        if none_row:
            lines.append(f"- Baseline check: `none` gets {none_row['correct']}/{none_row['n']} "
                         f"({none_row['accuracy'] * 100:.0f}%) with this prompt format at these lengths, far above chance.")
        lines.append("")
    lat = res.get("latency")
    if lat:
        lines += [
            "## 2. Latency per preset (same server, streaming)",
            "",
            f"{a['latency_prompts']} prompt(s) of ~{a['latency_tokens']} tokens per preset (each request its own prompt, so no "
            f"cache hit anywhere), {a['latency_output']} output tokens (ignore_eos), one request at a time, the presets' order "
            "rotating prompt by prompt. At the client: TTFT (the prefill worker's first token: the prefill plus, for compressed "
            "presets, encoding inside the forward pass), the gap from the first to the second token (the handoff: the last "
            "layers' transfer, the decode worker's install, dequantize for compressed payloads, its first step), and the "
            "inter-token latency after that (decode steps; a sparse payload leaves fewer KV slots to attend to). Medians.",
            "",
            *latency_table(lat),
            "",
        ]
    c = res.get("costs")
    if c:
        share = selection_share(c)
        lines += [
            "## 3. In-process costs (no HTTP: `KVRelayCluster(use_ray=False)`, in-process transport, same engines)",
            "",
            "### Encode share of the prefill",
            "",
            "One prompt per preset and length (each its own), after a warm-up request per preset. `encode` is the prefill "
            "worker's `encode_seconds` (selection + gather + quantize + framing, all layers, inside the forward pass); "
            "`prefill` its `prefill_seconds` (admission to first token). *min mass*: the lowest per-layer share of the window's "
            "attention the kept tokens hold.",
            "",
            *encode_table(c),
            "",
        ]
        if share:
            lines += ["Selection alone (goal ≤ 5% of the prefill): `select_layer` micro-time (below) × "
                      f"{c['kv_spec']['layers']} layers, scaled linearly to the prompt length: "
                      + "; ".join(f"{s['prompt_tokens']} tokens: {s['selection_s_est'] * 1e3:.0f} ms = {s['share'] * 100:.1f}% of "
                                  f"a {s['prefill_s']:.1f} s prefill" for s in share) + ".", ""]
        lines += [
            "### Per-layer micro-times",
            "",
            f"Median of {c['micro']['reps']} runs, one torch thread, random K/V (float32). Encode = `encode_layer` (quantize + "
            "header), decode = `decode_layer` (parse + dequantize to float32).",
            "",
            *micro_table(c),
            "",
            "### Decode-side capacity",
            "",
            f"One decode engine with {c['capacity']['num_kv_blocks']} KV blocks of {c['capacity']['block_size']} tokens; "
            "reservations of distinct prompts (`Engine.reserve` with the decode worker's own `_plan`: the payload plan of a "
            "whole-prompt ship) until CapacityError. A reservation holds `planned_slots` = the largest per-layer budget "
            "(every layer's cache has the same slots), not the mean. Quantization does not change it: the decode worker "
            "dequantizes into its float32 cache. Output tokens' blocks are not counted.",
            "",
            *capacity_table(c),
            "",
            f"Decode worker after part 3: {c.get('decode_stats')}.",
            "",
        ]
    lines += ["Every request's record (text, timings, per-request numbers) is in the JSON file next to this one.", ""]
    lines += reading_section(path)
    path.write_text("\n".join(lines))
    return lines


def plot(res: dict, path: Path) -> None:
    plt = pyplot()

    q, c = res.get("quality"), res.get("costs")
    panels = [x for x in ("quality", "capacity") if (x == "quality" and q) or (x == "capacity" and c)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    axes = axes[0]
    i = 0
    colors = {p: f"C{k}" for k, p in enumerate(PRESET_ORDER)}
    if q:
        ax = axes[i]
        i += 1
        for r in q["rows"]:
            if r["role"] != r["preset"] or not r.get("x_vs_16bit"):
                continue
            lo, hi = r["wilson"]
            y = r["accuracy"] * 100
            ax.errorbar([r["x_vs_16bit"]], [y], yerr=[[y - lo * 100], [hi * 100 - y]], fmt="o", capsize=4,
                        color=colors.get(r["preset"]), label=r["preset"])
            off = (6, -14) if r["preset"] in ("int8", "int4") else (6, 6)
            ax.annotate(r["preset"], (r["x_vs_16bit"], y), textcoords="offset points", xytext=off, fontsize=8)
        ax.set_xscale("log", base=2)
        ticks = [0.5, 1, 2, 4, 8, 16]
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.set_xlim(0.4, 20)
        ax.set_xlabel("KV bytes on the wire: times smaller than 16-bit (log2)")
        ax.set_ylabel("needle accuracy, % (Wilson 95%)")
        ax.set_ylim(-5, 105)
        n = q["rows"][0]["n"] if q["rows"] else 0
        ax.set_title(f"Quality vs bytes ({n} needle prompts per preset)", fontsize=10)
        ax.grid(alpha=0.3)
    if c:
        ax = axes[i]
        rows = c["capacity"]["rows"]
        lengths = sorted({r["length"] for r in rows})
        presets = [p for p in PRESET_ORDER if any(r["preset"] == p for r in rows)]
        width = 0.8 / len(lengths)
        for k, L in enumerate(lengths):
            vals = [next(r["requests"] for r in rows if r["length"] == L and r["preset"] == p) for p in presets]
            bars = ax.bar([x + (k - (len(lengths) - 1) / 2) * width for x in range(len(presets))], vals, width,
                          label=f"{L}-token prompts")
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(presets)), presets)
        ax.set_ylabel(f"requests reserved at once ({c['capacity']['num_kv_blocks']} blocks)")
        ax.set_title("Decode-side capacity per preset", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"kvrelay compressed KV payloads, SmolLM2-135M on CPU; {res['meta']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(res: dict, stem: Path) -> list[str]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_name(stem.name + ".md")
    if res.get("quality"):  # summaries always from the raw records (so --render picks up changes)
        q = res["quality"]
        q["rows"] = summarize_quality(q["records"], q["metrics"], res["args"]["presets"])
    stem.with_name(stem.name + ".json").write_text(json.dumps(res,
                                                             indent=1, default=str) + "\n")
    plot(res, stem.with_name(stem.name + ".png"))
    lines = write_md(res, md, stem.name + ".png")
    log(f"wrote {stem}.{{md,json,png}}")
    return lines


def print_tables(res: dict) -> None:
    out = []
    if res.get("quality"):
        out += ["## 1. needle accuracy and wire bytes", *quality_table(res["quality"]), ""]
    if res.get("latency"):
        out += ["## 2. latency", *latency_table(res["latency"]), ""]
    if res.get("costs"):
        c = res["costs"]
        out += ["## 3. encode share", *encode_table(c), "", "## 3. micro", *micro_table(c), "", "## 3. capacity",
                *capacity_table(c), ""]
    print("\n".join(out))


# ---------------------------------------------------------------------------------------


def meta(argv, t_run: float, load_before) -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except Exception:  # noqa: BLE001
        commit = "?"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.compression", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "git_commit": commit, "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "run_s": t_run,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        res = json.loads(path.read_text())
        if args.note:
            res["meta"]["note"] = args.note
        render(res, path.with_suffix(""))
        print_tables(res)
        return 0
    from router.tokenizer import load_tokenizer
    from workers.loader import resolve_model

    t0 = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    tok = load_tokenizer(resolve_model("default"))
    res: dict[str, Any] = {"args": vars(args)}
    if 1 in args.parts or 2 in args.parts:
        serve_args = ["--prefill-workers", "1", "--decode-workers", "1", "--threads", "1"]
        for k, v in SERVER_ENGINE.items():
            serve_args += ["--set", f"engine.{k}={v}"]
        for k, v in SERVER_DEADLINES.items():
            serve_args += ["--set", f"deadlines.{k}={v}"]
        server = Server("compression", serve_args, startup_timeout_s=600)
        server.start()
        res["server"] = {"args": serve_args, "startup_s": server.startup_s}
        try:
            import httpx

            model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]

            async def http_parts() -> None:
                await warm_up(server.url, model, tok, args.presets, args.seed)
                if 1 in args.parts:
                    res["quality"] = await part_quality(server.url, model, tok, args)
                if 2 in args.parts:
                    res["latency"] = await part_latency(server.url, model, tok, args)

            asyncio.run(http_parts())
        finally:
            server.stop()
            res["server"]["log"] = server.log.name
    if 3 in args.parts:
        res["costs"] = part_costs(tok, args)
    res["meta"] = meta(argv, time.perf_counter() - t0, load_before)
    res["meta"]["note"] = args.note
    if args.out:
        render(res, Path(args.out))
    print_tables(res)
    log(f"done in {res['meta']['run_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
