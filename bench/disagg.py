"""Disaggregated vs colocated serving, side by side, on real Ray actors, real UCX and
the real SmolLM2.

    python -m bench.disagg                   # full run (~12 min on a busy 2-core machine)
    python -m bench.disagg --wait-quiet 600  # first wait up to 10 min for a load average < 1
    python -m bench.disagg --quick           # smoke run (~3 min; writes disagg_quick.* files)
    python -m bench.disagg --render bench/results/disagg.json   # tables and plot again

One run starts three clusters side by side (all up at once: idle workers cost next to
nothing), with identical engines (``cpus_per_worker 1``, ``threads_per_worker 1``, so
every worker computes on one core):

  colocated        2 colocated workers (each does prefill and decode; no transfer)
  disagg-layerwise 1 prefill + 1 decode worker, KV over UCX, each layer shipped as soon
                   as it is computed (``transfer.layerwise: true``)
  disagg-bulk      1 prefill + 1 decode worker, KV over UCX, every layer shipped after
                   the last one is computed (``transfer.layerwise: false``, the baseline)

and measures on each:

1. **TTFT and exposed transfer.** Prompts of ``--sizes`` tokens (default 256, 1024,
   4096), ``--reps`` of each, one request at a time, the three modes interleaved
   request by request (so a busy minute on a shared machine hits every mode alike; the
   mode that goes first rotates), every prompt distinct from its
   first block on (a unique number starts it, so no prefix-cache hit anywhere); the same
   prompts go to every cluster. At the client: TTFT (first token) and the time to the
   second token. In disaggregated mode the first token comes back from the prefill
   worker as soon as the prefill is done, *before* the KV has necessarily arrived on the
   decode worker, so whatever transfer is left shows up in the second token, not the
   first. From the workers' logs (``prefill_log`` / ``transfer_log``, wall clocks of one
   machine): the exposed transfer = last layer's arrival on the decode worker minus the
   last layer's compute on the prefill worker, the whole transfer span, and the bytes
   shipped.
2. **Interference.** ``--streams`` requests decode steadily (short distinct prompts,
   ``ignore_eos``); after a quiet window, long prompts (``--long-tokens``) arrive on a
   fixed schedule (``--arrivals`` of them every ``--interval`` s, the same schedule for
   both clusters). The decode streams' inter-token latency (ITL: the gap between
   consecutive tokens of one stream, at the client) is reported p50/p99 for the quiet
   and the loaded windows, colocated (2 workers) vs disaggregated (1 prefill + 1 decode,
   layer-wise): the same number of workers, the same cores, the same offered load.
   ``--rounds`` runs per configuration, alternating which goes first (the bulk cluster
   is shut down by then); the gaps of all rounds are pooled.
   Placement is round-robin in both (streams and long prompts alternate between the two
   colocated workers), so both colocated workers carry the same share.

Everything goes to ``bench/results/disagg.{md,png,json}`` (``disagg_quick.*`` with
``--quick``). Medians and percentiles are over requests (TTFT) and over tokens (ITL);
every raw record is in the JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import itertools
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from bench.report import machine_info, percentile, pyplot, reading_section, wait_quiet
from cluster.worker_api import WorkerAPI

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODES = ("colocated", "disagg-layerwise", "disagg-bulk")
LABELS = {
    "colocated": "colocated",
    "disagg-layerwise": "disaggregated, UCX, layer-wise",
    "disagg-bulk": "disaggregated, UCX, all layers after the last",
}

PRESETS = {
    "full": dict(sizes=[256, 1024, 4096], reps=3, streams=4, long_tokens=1024, arrivals=6, interval=5.0, quiet=8.0, rounds=2),
    "quick": dict(sizes=[256, 1024], reps=2, streams=4, long_tokens=1024, arrivals=3, interval=5.0, quiet=5.0, rounds=1),
}

# 0.5 GB = ~11k tokens of SmolLM2 KV per worker: room for a 4k prompt, and for the decode
# worker's reservations of queued long prompts next to the streams (a disaggregated decode
# worker reserves a request's blocks before its prefill even starts).
ENGINE = {"kv_cache_memory_gb": 0.5, "chunk_size": 512, "max_num_batched_tokens": 2048, "block_size": 16}
DEADLINES = {
    "startup_s": 600.0, "reserve_s": 120.0, "prefill_s": 600.0, "transfer_s": 300.0, "token_s": 300.0,
    "health_interval_s": 1.0, "health_timeout_s": 120.0, "drain_s": 60.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (sizes 256 1024, 2 reps, 3 arrivals); writes disagg_quick.*")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="prompt sizes in tokens (default 256 1024 4096)")
    p.add_argument("--reps", type=int, default=None, help="requests per prompt size and mode (default 3); medians reported")
    p.add_argument("--streams", type=int, default=None, help="steadily decoding requests in the interference test (default 4)")
    p.add_argument("--long-tokens", type=int, default=None, help="tokens of each arriving long prompt (default 1024)")
    p.add_argument("--long-max-tokens", type=int, default=8, help="output tokens of each long request (default 8)")
    p.add_argument("--arrivals", type=int, default=None, help="long prompts in the loaded window (default 6)")
    p.add_argument("--interval", type=float, default=None, help="seconds between long prompt arrivals (default 5)")
    p.add_argument("--poisson", action="store_true", help="exponential inter-arrival times (mean --interval) instead of fixed")
    p.add_argument("--quiet", type=float, default=None, help="seconds of ITL measured before the first arrival (default 8)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interference runs per configuration, alternating which goes first (default 2); gaps pooled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="output directory (default bench/results)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds (polling every 60s) for a 1-minute load average below 1.0")
    p.add_argument("--note", default=None, help="a sentence for the report's load note (e.g. what else ran)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="no run: write the .md and .png again from a finished run's JSON file")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.sizes = sorted(set(args.sizes))
    if min(args.sizes) < 32 or args.reps < 1 or args.streams < 1 or args.arrivals < 1 or args.rounds < 1 or args.interval <= 0:
        p.error("--sizes >= 32, --reps/--streams/--arrivals/--rounds >= 1, --interval > 0")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------


class Prompts:
    """Distinct prompts of exact token counts: a unique number first, then filler text."""

    def __init__(self, tokenizer, max_tokens: int) -> None:
        from tests.integration.prompts import long_text

        self.tok = tokenizer
        n_chars = 4096
        while True:
            self.body = tokenizer.encode(long_text(n_chars))
            if len(self.body) >= max_tokens + 64:
                break
            n_chars *= 2
        self._uid = itertools.count(1000)

    def make(self, n_tokens: int, kind: str) -> list[int]:
        uid = next(self._uid)
        head = self.tok.encode(f"#{uid} ({kind}) Read this and continue:\n")
        return head + self.body[: max(0, n_tokens - len(head))]


# ---------------------------------------------------------------------------------------
# clusters
# ---------------------------------------------------------------------------------------


def cluster_config(mode: str):
    from cluster.config import ClusterConfig

    pools = {"cpus_per_worker": 1, "threads_per_worker": 1}
    transfer = {"transport": "ucx", "layerwise": True}
    if mode == "colocated":
        pools.update(colocated=True, decode_workers=2)
    else:
        pools.update(colocated=False, prefill_workers=1, decode_workers=1)
        transfer["layerwise"] = mode == "disagg-layerwise"
    return ClusterConfig.build({"engine": dict(ENGINE), "pools": pools, "transfer": transfer, "deadlines": dict(DEADLINES)})


def round_robin():
    """Placement for the benchmark: prefill and decode workers each in turn, so the two
    colocated workers get the same share of streams and long prompts."""
    rp, rd = itertools.count(), itertools.count()

    def choose(prefill, decode, prompt):
        p = prefill[next(rp) % len(prefill)] if prefill else None
        return p, decode[next(rd) % len(decode)]

    return choose


async def timed_request(cluster, prompt: list[int], params, rid: str, sink: list | None = None) -> dict:
    """One request at the client: submit time, arrival time of every token."""
    t0 = time.perf_counter()
    times: list[float] = []
    async for out in cluster.generate(prompt, params, rid):
        now = time.perf_counter()
        times += [now] * len(out.new_token_ids)
        if sink is not None:
            sink.append((now, len(out.new_token_ids)))
    return {"t0": t0, "times": times}


async def worker_call(pool, index: int, method, *args):
    return await pool.workers[index].handle.call(method, *args, timeout_s=60)


# ---------------------------------------------------------------------------------------
# 1. TTFT and exposed transfer
# ---------------------------------------------------------------------------------------


async def measure_ttft_one(cluster, mode: str, size: int, rep: int, prompt: list[int]) -> dict:
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=3, min_tokens=3, temperature=0.0, ignore_eos=True)
    rid = f"ttft-{mode}-{size}-{rep}"
    load = os.getloadavg()[0]
    r = await timed_request(cluster, prompt, params, rid)
    rec = {
        "mode": mode, "size": size, "rep": rep, "prompt_tokens": len(prompt), "request_id": rid, "loadavg_1m": round(load, 2),
        "ttft_s": r["times"][0] - r["t0"], "t2t_s": r["times"][1] - r["t0"], "first_to_second_s": r["times"][1] - r["times"][0],
        "tpot_s": (r["times"][-1] - r["times"][1]) / max(1, len(r["times"]) - 2),
    }
    if cluster.prefill is not None:
        p = await worker_call(cluster.prefill, 0, WorkerAPI.prefill_log, rid)
        arrived = await worker_call(cluster.decode, 0, WorkerAPI.transfer_log, rid)
        last = max(p.layer_computed_at)
        rec.update(
            bytes_sent=p.bytes_sent, full_bytes=p.full_bytes, prefill_worker_s=p.prefill_seconds,
            num_cached_tokens=p.num_cached_tokens, layers=last + 1, layers_arrived=len(arrived),
            last_layer_computed_at=p.layer_computed_at[last],
            first_layer_computed_at=min(p.layer_computed_at.values()),
            first_layer_sent_at=min(p.layer_sent_at.values()) if p.layer_sent_at else None,
            last_arrival_at=max(arrived.values()) if arrived else None,
            first_arrival_at=min(arrived.values()) if arrived else None,
        )
        if arrived:
            rec["exposed_transfer_s"] = rec["last_arrival_at"] - rec["last_layer_computed_at"]
            rec["transfer_span_s"] = rec["last_arrival_at"] - rec["first_layer_sent_at"]
            # layers already on the decode worker when the prefill's last layer was done
            rec["layers_in_before_last_computed"] = sum(t <= rec["last_layer_computed_at"] for t in arrived.values())
    extra = ""
    if "exposed_transfer_s" in rec:
        extra = (f", exposed transfer {rec['exposed_transfer_s'] * 1e3:.1f} ms of {rec['transfer_span_s'] * 1e3:.1f} ms, "
                 f"{rec['bytes_sent'] / 1e6:.1f} MB")
    log(f"  {mode} {len(prompt)} tok #{rep}: TTFT {rec['ttft_s']:.3f}s, 2nd token {rec['t2t_s']:.3f}s{extra} (load {load:.1f})")
    return rec


# ---------------------------------------------------------------------------------------
# 2. Interference: decode ITL while long prompts arrive
# ---------------------------------------------------------------------------------------


def arrival_offsets(args) -> list[float]:
    if not args.poisson:
        return [i * args.interval for i in range(args.arrivals)]
    rng = random.Random(args.seed)
    t, out = 0.0, []
    for _ in range(args.arrivals):
        out.append(t)
        t += rng.expovariate(1.0 / args.interval)
    return out


async def measure_interference(cluster, mode: str, args, stream_prompts: list[list[int]], long_prompts: list[list[int]], tag: str) -> dict:
    from workers.sampling_params import SamplingParams

    stream_params = SamplingParams(max_tokens=4000, min_tokens=4000, temperature=0.0, ignore_eos=True)
    long_params = SamplingParams(max_tokens=args.long_max_tokens, min_tokens=args.long_max_tokens, temperature=0.0, ignore_eos=True)
    sinks: list[list[tuple[float, int]]] = [[] for _ in stream_prompts]
    streams = [
        asyncio.create_task(timed_request(cluster, p, stream_params, f"stream-{mode}-{tag}-{i}", sinks[i]))
        for i, p in enumerate(stream_prompts)
    ]
    # steady state: every stream past its first few tokens
    t_wait = time.perf_counter()
    while min(sum(n for _, n in s) for s in sinks) < 8:
        if time.perf_counter() - t_wait > 300:
            raise RuntimeError(f"{mode}: decode streams did not start within 300s")
        for t in streams:
            if t.done():
                t.result()  # raises the stream's error
        await asyncio.sleep(0.05)
    quiet_start = time.perf_counter()
    await asyncio.sleep(args.quiet)
    loaded_start = time.perf_counter()
    load = os.getloadavg()[0]
    offsets = arrival_offsets(args)

    async def arrive(i: int, offset: float, prompt: list[int]) -> dict:
        await asyncio.sleep(max(0.0, loaded_start + offset - time.perf_counter()))
        t0 = time.perf_counter()
        try:
            r = await timed_request(cluster, prompt, long_params, f"long-{mode}-{tag}-{i}")
        except Exception as e:  # noqa: BLE001 - e.g. CapacityError: counted, the run goes on
            log(f"  long request {i} failed: {e!r}")
            return {"offset_s": offset, "submitted_s": t0 - loaded_start, "error": repr(e), "prompt_tokens": len(prompt)}
        return {"offset_s": offset, "submitted_s": r["t0"] - loaded_start, "ttft_s": r["times"][0] - r["t0"],
                "e2e_s": r["times"][-1] - r["t0"], "prompt_tokens": len(prompt)}

    longs = await asyncio.gather(*(arrive(i, o, p) for i, (o, p) in enumerate(zip(offsets, long_prompts))))
    loaded_end = time.perf_counter()
    for t in streams:
        if t.done():
            t.result()
        t.cancel()
    await asyncio.gather(*streams, return_exceptions=True)

    def gaps(lo: float, hi: float) -> list[float]:
        out = []
        for s in sinks:
            times = [t for t, n in s for _ in range(n)]
            out += [b - a for a, b in zip(times, times[1:]) if lo <= b <= hi]
        return out

    quiet, loaded = gaps(quiet_start, loaded_start), gaps(loaded_start, loaded_end)
    return {
        "mode": mode,
        "loadavg_1m": round(load, 2),
        "quiet_window_s": loaded_start - quiet_start,
        "loaded_window_s": loaded_end - loaded_start,
        "stream_tokens": [sum(n for _, n in s) for s in sinks],
        "multi_token_outputs": sum(1 for s in sinks for _, n in s if n > 1),
        "itl_quiet": summarize(quiet),
        "itl_loaded": summarize(loaded),
        "itl_quiet_raw": quiet,
        "itl_loaded_raw": loaded,
        "long_requests": longs,
    }


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------


def summarize(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99), "max": max(xs) if xs else None,
            "mean": statistics.fmean(xs) if xs else None, "tokens_per_s": len(xs) / sum(xs) if xs and sum(xs) > 0 else None}


def med(records: list[dict], key: str) -> float | None:
    xs = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


async def wait_idle(cluster, timeout_s: float = 60.0) -> None:
    """Until no worker runs or queues anything (aborted streams have landed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = 0
        for pool in cluster.pools:
            for w in pool.workers:
                h = await w.handle.call(WorkerAPI.health, timeout_s=60)
                busy += h.running + h.waiting
        if not busy:
            return
        await asyncio.sleep(0.5)
    log("  warning: workers still busy after the interference run")


async def run(args) -> dict:
    from cluster.cluster import KVRelayCluster
    from router.tokenizer import load_tokenizer
    from workers.loader import resolve_model
    from workers.sampling_params import SamplingParams

    tok = load_tokenizer(resolve_model())
    pr = Prompts(tok, max(max(args.sizes), args.long_tokens))
    # The same prompts go to every cluster (each cluster has its own, empty, prefix caches).
    warmup = [pr.make(64, "warm-up"), pr.make(min(args.sizes[-1], 512), "warm-up")]
    ttft_prompts = {s: [pr.make(s, "ttft") for _ in range(args.reps)] for s in args.sizes}
    inter_modes = ["colocated", "disagg-layerwise"]
    rounds = [{"streams": [pr.make(48, "stream") for _ in range(args.streams)],
               "longs": [pr.make(args.long_tokens, "long") for _ in range(args.arrivals)]} for _ in range(args.rounds)]

    out: dict = {"ttft": [], "interference_rounds": [], "startup_s": {}, "worker_stats": {}}
    # All three clusters are up at once (idle ones cost next to nothing), so the TTFT
    # requests can be interleaved across modes: load from other processes on this
    # machine then hits every mode alike instead of whichever ran during a busy minute.
    clusters = {m: KVRelayCluster(cluster_config(m), use_ray=True, choose=round_robin()) for m in MODES}
    try:
        t = time.perf_counter()
        log(f"starting {len(MODES)} clusters ({sum(len(p.specs) for c in clusters.values() for p in c.pools)} worker actors)")
        await asyncio.gather(*(c.start() for c in clusters.values()))
        out["startup_s"]["all clusters"] = time.perf_counter() - t
        log(f"clusters up in {out['startup_s']['all clusters']:.1f}s; warm-up")
        warm = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0, ignore_eos=True)
        for mode, c in clusters.items():
            for k in range(2 if mode == "colocated" else 1):  # both colocated workers
                for i, p in enumerate(warmup):
                    await timed_request(c, p, warm, f"warm-{mode}-{i}-{k}")

        log("TTFT: one request at a time, modes interleaved")
        for size in args.sizes:
            for rep, prompt in enumerate(ttft_prompts[size]):
                order = MODES[rep % 3:] + MODES[: rep % 3]  # rotate who goes first
                for mode in order:
                    out["ttft"].append(await measure_ttft_one(clusters[mode], mode, size, rep, prompt))

        for mode in [m for m in MODES if m not in inter_modes]:
            out["worker_stats"][mode] = await clusters[mode].worker_stats()
            await clusters.pop(mode).shutdown()
            log(f"{mode}: shut down")

        for r, prompts in enumerate(rounds):
            order = inter_modes if r % 2 == 0 else inter_modes[::-1]
            for mode in order:
                log(f"interference round {r + 1}/{len(rounds)}, {mode}: {args.streams} streams, "
                    f"{args.arrivals} x {args.long_tokens}-token prompts every {args.interval}s")
                res = await measure_interference(clusters[mode], mode, args, prompts["streams"], prompts["longs"], tag=f"r{r}")
                res["round"] = r
                out["interference_rounds"].append(res)
                q, l_ = res["itl_quiet"], res["itl_loaded"]
                log(f"  ITL quiet p50 {q['p50'] * 1e3:.0f} ms p99 {q['p99'] * 1e3:.0f} ms; "
                    f"loaded p50 {l_['p50'] * 1e3:.0f} ms p99 {l_['p99'] * 1e3:.0f} ms (load {res['loadavg_1m']})")
                await wait_idle(clusters[mode])
        for mode, c in clusters.items():
            out["worker_stats"][mode] = await c.worker_stats()
    finally:
        await asyncio.gather(*(c.shutdown() for c in clusters.values()), return_exceptions=True)
        log("clusters shut down")

    # ITL over every round, per mode
    out["interference"] = {}
    for mode in inter_modes:
        runs = [x for x in out["interference_rounds"] if x["mode"] == mode]
        quiet = [g for x in runs for g in x.pop("itl_quiet_raw")]
        loaded = [g for x in runs for g in x.pop("itl_loaded_raw")]
        out["interference"][mode] = {
            "mode": mode, "rounds": len(runs),
            "quiet_window_s": sum(x["quiet_window_s"] for x in runs), "loaded_window_s": sum(x["loaded_window_s"] for x in runs),
            "itl_quiet": summarize(quiet), "itl_loaded": summarize(loaded),
            "long_requests": [lr for x in runs for lr in x["long_requests"]],
            "stream_tokens": [n for x in runs for n in x["stream_tokens"]],
            "multi_token_outputs": sum(x["multi_token_outputs"] for x in runs),
            "itl_quiet_raw": quiet, "itl_loaded_raw": loaded,
        }
    return out


# ---------------------------------------------------------------------------------------
# tables and plot
# ---------------------------------------------------------------------------------------


def ttft_tables(res: dict, args) -> tuple[list[dict], str]:
    rows = []
    for size in args.sizes:
        row: dict = {"size": size}
        for mode in MODES:
            recs = [r for r in res["ttft"] if r["mode"] == mode and r["size"] == size]
            row[mode] = {k: med(recs, k) for k in ("ttft_s", "t2t_s", "first_to_second_s", "tpot_s", "exposed_transfer_s", "transfer_span_s",
                                                     "bytes_sent", "prefill_worker_s", "layers_in_before_last_computed")}
            row[mode]["n"] = len(recs)
            row[mode]["prompt_tokens"] = med(recs, "prompt_tokens")
        lw, bulk = row["disagg-layerwise"]["exposed_transfer_s"], row["disagg-bulk"]["exposed_transfer_s"]
        row["hidden_fraction"] = (1 - lw / bulk) if lw is not None and bulk else None
        rows.append(row)

    n_layers = next((r["layers"] for r in res["ttft"] if "layers" in r), "?")

    def ms(x):
        return "–" if x is None else f"{x * 1e3:.0f}"

    def ms1(x):
        return "–" if x is None else f"{x * 1e3:.1f}"

    t = ["| prompt tokens | colocated TTFT (ms) | disagg layer-wise TTFT (ms) | disagg bulk TTFT (ms) | layer-wise / colocated | bulk / colocated |",
         "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, lw, b = (r[m]["ttft_s"] for m in MODES)
        t.append(f"| {r['size']} | {ms(c)} | {ms(lw)} | {ms(b)} | {lw / c:.2f}x | {b / c:.2f}x |")
    t += ["", "Time to the **second** token (includes whatever KV transfer the first token did not wait for); in brackets the "
          "median gap between the first and the second token:", "",
          "| prompt tokens | colocated (ms) | disagg layer-wise (ms) | disagg bulk (ms) | layer-wise / colocated | bulk / colocated |",
          "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, lw, b = (r[m]["t2t_s"] for m in MODES)
        g = [ms(r[m]["first_to_second_s"]) for m in MODES]
        t.append(f"| {r['size']} | {ms(c)} ({g[0]}) | {ms(lw)} ({g[1]}) | {ms(b)} ({g[2]}) | {lw / c:.2f}x | {b / c:.2f}x |")
    t += ["", "KV transfer, from the workers' own logs (exposed = last layer's arrival on the decode worker − "
          "last layer's compute on the prefill worker; span = last arrival − first layer handed to UCX):", "",
          "| prompt tokens | KV bytes shipped | bulk: exposed (= span) (ms) | layer-wise: exposed (ms) | layer-wise: span (ms) "
          "| layers already in when prefill ended (layer-wise) | transfer hidden by layer-wise |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lw, b = r["disagg-layerwise"], r["disagg-bulk"]
        hid = "–" if r["hidden_fraction"] is None else f"{r['hidden_fraction'] * 100:.0f}%"
        nbytes = lw["bytes_sent"] or b["bytes_sent"]
        t.append(f"| {r['size']} | {nbytes / 1e6:.1f} MB | {ms1(b['exposed_transfer_s'])} | {ms1(lw['exposed_transfer_s'])} "
                 f"| {ms1(lw['transfer_span_s'])} | {lw['layers_in_before_last_computed']:.0f} / {n_layers} | {hid} |")
    return rows, "\n".join(t)


def itl_table(res: dict) -> str:
    t = ["| configuration | window | ITL p50 (ms) | ITL p90 (ms) | ITL p99 (ms) | ITL max (ms) | 1 / mean ITL (tok/s per stream) | gaps |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, r in res["interference"].items():
        for w in ("quiet", "loaded"):
            s = r[f"itl_{w}"]
            if not s["n"]:
                continue
            t.append(f"| {LABELS[mode]} | {w} ({r[f'{w}_window_s']:.0f}s) | {s['p50'] * 1e3:.0f} | {s['p90'] * 1e3:.0f} | "
                     f"{s['p99'] * 1e3:.0f} | {s['max'] * 1e3:.0f} | {s['tokens_per_s']:.1f} | {s['n']} |")
    if len(res.get("interference_rounds", [])) > len(res["interference"]):
        t += ["", "Per round (in the order they ran):", "",
              "| round | configuration | 1-min load avg | quiet p50 / p99 (ms) | loaded p50 / p99 (ms) | loaded window (s) |",
              "|---:|---|---:|---:|---:|---:|"]
        for x in res["interference_rounds"]:
            q, l_ = x["itl_quiet"], x["itl_loaded"]
            t.append(f"| {x['round'] + 1} | {LABELS[x['mode']]} | {x['loadavg_1m']} | {q['p50'] * 1e3:.0f} / {q['p99'] * 1e3:.0f} | "
                     f"{l_['p50'] * 1e3:.0f} / {l_['p99'] * 1e3:.0f} | {x['loaded_window_s']:.0f} |")
    inter = res["interference"]
    if "colocated" in inter and "disagg-layerwise" in inter:
        c, d = inter["colocated"]["itl_loaded"], inter["disagg-layerwise"]["itl_loaded"]
        t += ["", f"Loaded window, disaggregated / colocated: ITL p50 {d['p50'] / c['p50']:.2f}x, p99 {d['p99'] / c['p99']:.2f}x "
              "(below 1 = disaggregation helps)."]
        t += ["", "Long requests (the arrivals) in the same windows:", "",
              "| configuration | long prompts | failed | median TTFT (s) | max TTFT (s) | median end-to-end (s) |", "|---|---:|---:|---:|---:|---:|"]
        for mode, r in inter.items():
            L = [x for x in r["long_requests"] if "error" not in x]
            nfail = len(r["long_requests"]) - len(L)
            if not L:
                t.append(f"| {LABELS[mode]} | {len(r['long_requests'])} | {nfail} | – | – | – |")
                continue
            t.append(f"| {LABELS[mode]} | {len(r['long_requests'])} | {nfail} | {statistics.median(x['ttft_s'] for x in L):.2f} | "
                     f"{max(x['ttft_s'] for x in L):.2f} | {statistics.median(x['e2e_s'] for x in L):.2f} |")
    return "\n".join(t)


def plot(res: dict, rows: list[dict], path: Path, title_note: str) -> None:
    import matplotlib.ticker

    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"colocated": "tab:gray", "disagg-layerwise": "tab:blue", "disagg-bulk": "tab:orange"}
    sizes = [r["size"] for r in rows]
    for mode in MODES:
        a.plot(sizes, [r[mode]["ttft_s"] for r in rows], "o-", color=colors[mode], label=f"{LABELS[mode]}: TTFT")
        a.plot(sizes, [r[mode]["t2t_s"] for r in rows], "s--", color=colors[mode], alpha=0.6, label=f"{LABELS[mode]}: 2nd token")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xticks(sizes, [str(s) for s in sizes])
    ys = [r[m][k] for r in rows for m in MODES for k in ("ttft_s", "t2t_s") if r[m][k]]
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200) if min(ys) / 1.5 <= t <= max(ys) * 1.5]
    a.set_yticks(ticks, [f"{t:g}" for t in ticks])
    a.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_xlabel("prompt tokens")
    a.set_ylabel("seconds (median)")
    a.set_title("Time to first / second token")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)

    inter = res["interference"]
    labels, p50, p99 = [], [], []
    for mode, r in inter.items():
        for w in ("quiet", "loaded"):
            s = r[f"itl_{w}"]
            if s["n"]:
                labels.append(f"{'colocated' if mode == 'colocated' else 'disagg'}\n{w}")
                p50.append(s["p50"] * 1e3)
                p99.append(s["p99"] * 1e3)
    x = range(len(labels))
    b.bar([i - 0.2 for i in x], p50, 0.4, label="ITL p50", color="tab:blue")
    b.bar([i + 0.2 for i in x], p99, 0.4, label="ITL p99", color="tab:red")
    for i, (u, v) in enumerate(zip(p50, p99)):
        b.text(i - 0.2, u, f"{u:.0f}", ha="center", va="bottom", fontsize=8)
        b.text(i + 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    b.set_xticks(list(x), labels)
    b.set_yscale("log")
    b.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    b.set_ylabel("ms between tokens of a decoding stream (log)")
    b.set_title("Decode ITL while long prompts arrive (same 2 cores)")
    b.legend()
    b.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title_note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_md(res: dict, args, rows: list[dict], ttft_md: str, path: Path, png_name: str) -> None:
    m = res["machine"]
    cmd = "python -m bench.disagg" + (" --quick" if args.quick else "")
    if res["argv"]:
        cmd = "python -m bench.disagg " + " ".join(shlex.quote(a) for a in res["argv"])
    lines = [
        "# Disaggregated vs colocated serving (CPU, real Ray + UCX + SmolLM2)", "",
        f"Reproduce: `{cmd}`" + (" (smoke run: fewer sizes and repetitions)" if args.quick else ""), "",
        "| | |", "|---|---|",
        f"| date | {res['date']} |",
        f"| CPU | {m['cpu']} ({m['logical_cpus']} logical CPUs), no GPU |",
        f"| python / torch / ray / ucxx / transformers | {m['python']} / {m['torch']} / {m['ray']} / {m['ucxx']} / {m['transformers']} |",
        f"| git commit | {m['git_commit']} |",
        "| model | SmolLM2-135M-Instruct (embedded GGUF, float32), 30 layers, 3 KV heads × 64 |",
        "| workers | every worker a Ray actor with 1 CPU and 1 torch thread; colocated: 2 workers; disaggregated: 1 prefill + 1 decode |",
        f"| engine | block {ENGINE['block_size']}, chunked prefill {ENGINE['chunk_size']} tokens, max_num_batched_tokens {ENGINE['max_num_batched_tokens']}, "
        f"KV cache {ENGINE['kv_cache_memory_gb']} GB per worker, prefix caching on (every prompt distinct from its first block) |",
        "| transport | UCX (ucxx, progress thread) between two processes of one host: shared memory / TCP |",
        f"| TTFT test | sizes {args.sizes}, {args.reps} distinct prompts each (the same ones for every mode), one request at a time, modes interleaved, 3 output tokens, medians |",
        f"| interference test | {args.streams} decode streams; after a {args.quiet:.0f}s quiet window, {args.arrivals} prompts of {args.long_tokens} tokens "
        f"({args.long_max_tokens} output tokens each) {'Poisson, mean' if args.poisson else 'every'} {args.interval}s; round-robin placement; {args.rounds} round(s) per configuration, alternating order, gaps pooled |",
        f"| load average before / after | {res['loadavg_before']} / {res['loadavg_after']} |",
        f"| run time | {res['run_s']:.0f}s (starting the 3 clusters, 6 worker actors loading the model on 2 cores: {res['startup_s']['all clusters']:.0f}s) |",
        "",
    ]
    if res.get("load_note"):
        lines += [f"**Load.** {res['load_note']}", ""]
    lines += [f"![TTFT and ITL]({png_name})", "", "## 1. Time to first token and the exposed KV transfer", "", ttft_md, ""]
    lines += ["## 2. Decode inter-token latency while long prompts arrive", "", itl_table(res), ""]
    lines += ["Raw per-request records and every ITL gap are in the JSON file next to this one.", ""]
    lines += reading_section(path)
    path.write_text("\n".join(lines) + "\n")


def load_note(res: dict) -> str | None:
    """Say how busy the machine was, from the load averages sampled during the run."""
    ttft = [r["loadavg_1m"] for r in res["ttft"] if "loadavg_1m" in r]
    inter = [x["loadavg_1m"] for x in res.get("interference_rounds", []) if "loadavg_1m" in x]
    peak = max([res["loadavg_before"][0], *ttft, *inter])
    if peak < 1.0:
        return None
    parts = [f"The machine was shared with other jobs during this run (1-minute load average {res['loadavg_before'][0]} at the start"]
    if ttft:
        parts.append(f"median {statistics.median(ttft):.1f}, range {min(ttft):.1f}–{max(ttft):.1f} during the TTFT requests")
    if inter:
        parts.append(f"{', '.join(f'{x:.1f}' for x in inter)} at the start of the interference runs")
    note = "; ".join(parts) + "; this benchmark alone accounts for about 1 during the TTFT requests, one busy worker thread, and about 2 during the interference runs)."
    wq = res.get("wait_quiet")
    if wq and not wq["quiet"]:
        note += f" It waited {wq['waited_s']}s for a load average below {wq['threshold']} first and never saw one ({wq['loads']})."
    if res.get("note"):
        note += " " + res["note"]
    return note + " Absolute times are inflated and noisy; the side-by-side ratios (interleaved requests, alternating rounds) are what to read."


def render(res: dict, args, out_dir: Path, stem: str) -> tuple[list[dict], str]:
    rows, ttft_md = ttft_tables(res, args)
    res["ttft_summary"] = rows
    res["load_note"] = load_note(res)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    plot(res, rows, out_dir / f"{stem}.png", f"SmolLM2-135M, CPU ({res['machine']['logical_cpus']} cores), 1 thread per worker, UCX between processes; {res['date']}")
    write_md(res, args, rows, ttft_md, out_dir / f"{stem}.md", f"{stem}.png")
    return rows, ttft_md


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:  # tables and plot again from a finished run's JSON (no measuring)
        path = Path(args.render)
        res = json.loads(path.read_text())
        if args.note:
            res["note"] = args.note
        run_args = argparse.Namespace(**res["args"])
        render(res, run_args, path.parent, path.stem)
        log(f"rendered {path.parent / path.stem}.{{md,png}} from {path}")
        return
    import ray

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "disagg_quick" if args.quick else "disagg"
    wq = wait_quiet(args.wait_quiet, log=log) if args.wait_quiet > 0 else None
    t0 = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    log(f"load average {load_before}; ray.init")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        res = asyncio.run(run(args))
    finally:
        ray.shutdown()
    res["run_s"] = time.perf_counter() - t0
    res["loadavg_before"] = load_before
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["wait_quiet"] = wq
    res["note"] = args.note
    res["machine"] = machine_info(("torch", "ray", "ucxx-cu12", "transformers"))
    res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["argv"] = list(argv if argv is not None else sys.argv[1:])
    res["args"] = vars(args)
    res["engine"], res["deadlines"] = ENGINE, DEADLINES
    rows, ttft_md = render(res, args, out_dir, stem)
    log(f"wrote {out_dir / stem}.{{md,png,json}} in {res['run_s']:.0f}s")
    print(ttft_md)
    print()
    print(itl_table(res))


if __name__ == "__main__":
    main()
