"""Online serving benchmark over the OpenAI HTTP API: placement policies and
disaggregated vs colocated, on the same workloads, in one run.

    python -m bench.serving            # full run (~15 min on the 2-core CPU box)
    python -m bench.serving --quick    # smoke run (~5 min: 2 configurations, small workloads)
    python -m bench.serving --url http://127.0.0.1:8000 --workloads chat   # against a running server
    python -m bench.serving --render bench/results/serving.json            # redo .md/.png from a run

For every configuration a ``kvrelay serve`` is started as a subprocess on a free port,
waited for (GET /health == 200, with a deadline), warmed up, given each workload in
turn, and stopped (SIGTERM, then SIGKILL after a deadline). Configurations, one server
at a time (never two at once: they would share the 2 cores):

  kv_aware      2 prefill + 1 decode workers, placement kv_aware      } policies, same
  round_robin   2 prefill + 1 decode workers, placement round_robin   } workers
  least_loaded  2 prefill + 1 decode workers, placement least_loaded  }
  disagg_1p1d   1 prefill + 1 decode worker (KV over UCX), kv_aware   } the same 2 workers,
  colocated     2 colocated workers (prefill + decode each), kv_aware } two ways

Workloads (bench/workloads.py): multi-turn chat, a shared long system prompt, a
Mooncake trace replay scaled down. Per configuration and workload: TTFT, TPOT and ITL
p50/p90/p99, throughput, goodput under the SLO, errors (bench/loadgen.py), and from
the server's /metrics scraped before and after the workload (counter deltas, summed
over workers: what the engines realized) the prefill tokens computed and prefix-cache
hit tokens, next to the router's predicted hit tokens.

Results: ``bench/results/serving.{md,png,json}`` (``--out`` changes the prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any


from bench import workloads as W
from bench.server import Server, log
from bench.loadgen import SLO, RequestSpec, Session, counter_delta, format_summary, run_load, scrape, summarize
from bench.report import machine_info, md_table, pyplot, reading_section, wait_quiet

MODEL = "SmolLM2-135M-Instruct"

CONFIGS: dict[str, dict[str, Any]] = {
    "kv_aware": {"group": "policy", "policy": "kv_aware", "prefill": 2, "decode": 1, "colocated": False,
                 "label": "kv_aware, 2P+1D"},
    "round_robin": {"group": "policy", "policy": "round_robin", "prefill": 2, "decode": 1, "colocated": False,
                    "label": "round_robin, 2P+1D"},
    "least_loaded": {"group": "policy", "policy": "least_loaded", "prefill": 2, "decode": 1, "colocated": False,
                     "label": "least_loaded, 2P+1D"},
    "disagg_1p1d": {"group": "mode", "policy": "kv_aware", "prefill": 1, "decode": 1, "colocated": False,
                    "label": "disaggregated 1P+1D, kv_aware"},
    "colocated": {"group": "mode", "policy": "kv_aware", "prefill": 0, "decode": 2, "colocated": True,
                  "label": "colocated x2, kv_aware"},
}

# workload sizes: small, because one CPU stream decodes ~15-20 tok/s and prefill runs at
# a few hundred tokens/s per worker
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "configs": list(CONFIGS),
        "chat": dict(conversations=6, turns=10, doc_words=200, max_tokens=24, rate_per_s=0.5, think_s=0.5),
        "shared": dict(requests=16, system_words=350, max_tokens=16, rate_per_s=1.0),
        "trace": dict(requests=24, select="conversations", max_turns=4, input_scale=32, max_input_tokens=512,
                      max_output_tokens=16, time_scale=0.05),
    },
    "quick": {
        "configs": ["kv_aware", "round_robin"],
        "chat": dict(conversations=2, turns=2, doc_words=150, max_tokens=12, rate_per_s=1.0, think_s=0.5),
        "shared": dict(requests=6, system_words=300, max_tokens=12, rate_per_s=1.0),
        "trace": dict(requests=10, select="conversations", max_turns=3, input_scale=32, max_input_tokens=384,
                      max_output_tokens=12, time_scale=0.03),
    },
}
WORKLOAD_KEYS = {"chat": "multi_turn_chat", "shared": "shared_system_prompt", "trace": "mooncake_replay"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: kv_aware vs round_robin, small workloads")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--workloads", default="chat,shared,trace", help="comma-separated subset of chat,shared,trace")
    p.add_argument("--url", default=None, help="no servers started: run the workloads against this running server")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO: TTFT <= this many seconds (default 2)")
    p.add_argument("--slo-tpot", type=float, default=0.25, help="goodput SLO: TPOT <= this many seconds (default 0.25)")
    p.add_argument("--kv-cache-gb", type=float, default=0.5, help="KV cache per worker (engine.kv_cache_memory_gb)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each of --repeat-workloads this many times per server, run i with seed + i (fresh "
                        "documents / token ids), reported one by one")
    p.add_argument("--repeat-workloads", default="chat", help="which workloads --repeats repeats (default chat)")
    p.add_argument("--workload-param", action="append", default=[], metavar="WL.KEY=VALUE",
                   help="override a workload parameter of the preset, e.g. chat.turns=6 (repeatable)")
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `kvrelay serve --set` for every configuration (repeatable)")
    p.add_argument("--request-timeout", type=float, default=180.0, help="per-request deadline (s)")
    p.add_argument("--max-duration", type=float, default=240.0, help="per workload: no request sent after this (s)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="a server must be healthy within this (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default=str(W.TRACE_PATH), help="Mooncake trace (JSONL)")
    p.add_argument("--out", default="bench/results/serving", help="output prefix (.md/.png/.json added)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds (polling every 60s) for a 1-minute load average below --quiet-load")
    p.add_argument("--quiet-load", type=float, default=1.5)
    p.add_argument("--note", default=None, help="a sentence for the report (what else ran on the machine)")
    p.add_argument("--render", default=None, metavar="JSON", help="no run: write .md/.png again from a run's JSON")
    p.add_argument("--kv-sweep", default=None, metavar="BLOCKS,...",
                   help="no run: print the order-only LRU estimate (bench.workloads.lru_placement_estimate) of the "
                        "trace workload's computed prompt tokens, 2 prefill workers, at these KV sizes per worker")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    args.preset = "quick" if args.quick else "full"
    preset = PRESETS[args.preset]
    args.configs = args.configs.split(",") if args.configs else list(preset["configs"])
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")
    args.workloads = args.workloads.split(",")
    bad = [w for w in args.workloads if w not in WORKLOAD_KEYS]
    if bad:
        p.error(f"unknown workloads {bad}; choose from {list(WORKLOAD_KEYS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.overrides = {}
    for item in args.workload_param:
        key, _, value = item.partition("=")
        wl, _, param = key.partition(".")
        if wl not in WORKLOAD_KEYS or not param or param not in preset[wl] or not value:
            p.error(f"--workload-param {item!r}: expected WL.KEY=VALUE with WL in {list(WORKLOAD_KEYS)} and KEY one "
                    f"of that preset's parameters")
        args.overrides.setdefault(wl, {})[param] = type(preset[wl][param])(value)
    return args


def build_workloads(args: argparse.Namespace) -> list[W.Workload]:
    """The selected workloads, each ``--repeats`` times (run i: seed + i, named
    ``<workload>_r<i>`` when repeated)."""
    preset = PRESETS[args.preset]
    overrides = getattr(args, "overrides", {})
    out = []
    for key in args.workloads:
        params = {**preset[key], **overrides.get(key, {})}
        repeats = args.repeats if key in args.repeat_workloads.split(",") else 1
        for i in range(repeats):
            seed = args.seed + i
            if key == "chat":
                wl = W.multi_turn_chat(seed=seed, **params)
            elif key == "shared":
                wl = W.shared_system_prompt(seed=seed, **params)
            else:
                wl = W.mooncake_replay(seed=seed, path=args.trace, **params)
            if repeats > 1:
                wl.name = f"{wl.name}_r{i + 1}"
            out.append(wl)
    return out


# ---------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------


def serve_command(name: str, kv_cache_gb: float, extra_sets: list[str] = ()) -> list[str]:
    """``kvrelay serve`` arguments of one configuration (after ``--port``)."""
    c = CONFIGS[name]
    cmd = ["--policy", c["policy"], "--decode-workers", str(c["decode"]), "--set", f"engine.kv_cache_memory_gb={kv_cache_gb}"]
    for item in extra_sets:
        cmd += ["--set", item]
    if c["colocated"]:
        cmd.append("--colocated")
    else:
        cmd += ["--prefill-workers", str(c["prefill"])]
    return cmd


# ---------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------

COUNTERS = {
    "prefill_computed": "kvrelay_prefill_computed_tokens_total",
    "prefix_hit": "kvrelay_prefix_cache_hit_tokens_total",
    "prefix_query": "kvrelay_prefix_cache_query_tokens_total",
    "preemptions": "kvrelay_preemptions_total",
    "kv_recomputes": "kvrelay_kv_recomputes_total",
    "predicted_hit": "kvrelay_router_predicted_hit_tokens_total",
    "decisions": "kvrelay_router_decisions_total",
    "requests": "kvrelay_requests_total",
}
STATS_POLL_WAIT_S = 2.5  # the router polls the workers' counters every ~1 s


async def warm_up(url: str) -> None:
    """A few short requests (two at a time) so every worker has run the model once."""
    def spec(i: int) -> RequestSpec:
        return RequestSpec("chat", {"messages": [{"role": "user", "content": f"Warm-up {i}: name a colour."}],
                                    "max_tokens": 4, "temperature": 0.0})
    sessions = [Session(f"warm{i}", 0.0, [spec(2 * i), spec(2 * i + 1)]) for i in range(2)]
    recs, _ = await run_load(url, MODEL, sessions, max_requests=4, duration_s=120, request_timeout_s=120)
    bad = [r.error for r in recs if not r.ok]
    if bad:
        log(f"warm-up errors: {bad}")


async def measure(url: str, wl: W.Workload, args: argparse.Namespace, slo: SLO, before=None) -> dict[str, Any]:
    """Run one workload; ``before``: a scrape taken after the previous workload settled
    (nothing ran since), else one is taken here after the counters settle."""
    if before is None:
        await asyncio.sleep(STATS_POLL_WAIT_S)
        before = await scrape(url)
    load_before = os.getloadavg()
    progress = (lambda m: log("  " + m)) if args.verbose else None
    records, timing = await run_load(url, MODEL, wl.sessions, max_requests=10_000, duration_s=args.max_duration,
                                     request_timeout_s=args.request_timeout, progress=progress)
    await asyncio.sleep(STATS_POLL_WAIT_S)
    after = await scrape(url)
    summary = summarize(records, slo, timing["wall_s"])
    engine: dict[str, Any] = {}
    for key, name in COUNTERS.items():
        group = "worker" if key == "decisions" else ("status" if key == "requests" else ("role" if key != "predicted_hit" else None))
        engine[key] = counter_delta(before, after, name, group)
    return {"summary": summary, "engine": engine, "wall_s": timing["wall_s"], "loadavg_before": list(load_before),
            "_after": after,
            "loadavg_after": list(os.getloadavg()), "records": [r.to_json() for r in records]}


def prefill_side_hits(engine: dict[str, Any]) -> float:
    """Hit tokens that saved prefill compute: prefill workers, or colocated workers."""
    d = engine.get("prefix_hit", {})
    return sum(v for k, v in d.items() if k not in ("total", "decode"))


async def run_config(name: str, wls: list[W.Workload], args: argparse.Namespace, slo: SLO) -> dict[str, Any]:
    out: dict[str, Any] = {"config": name, **CONFIGS.get(name, {}), "workloads": {}}
    server = None
    url = args.url
    try:
        if url is None:
            server = Server(name, serve_command(name, args.kv_cache_gb, args.server_set), args.startup_timeout)
            out["command"] = " ".join(shlex.quote(c) for c in ["kvrelay", *server.cmd[3:]])
            await asyncio.to_thread(server.start)
            out["startup_s"] = server.startup_s
            url = server.url
        await warm_up(url)
        before = None
        for wl in wls:
            log(f"{name}: {wl.name} ({len(wl.sessions)} sessions)")
            t0 = time.monotonic()
            res = await measure(url, wl, args, slo, before)
            before = res.pop("_after")
            s = res["summary"]
            log(f"{name}: {format_summary(wl.name, s)} [{time.monotonic() - t0:.0f}s]; engine: prefill computed "
                f"{res['engine']['prefill_computed'].get('total', 0):.0f}, prefix hits {res['engine']['prefix_hit']}, "
                f"predicted {res['engine']['predicted_hit'].get('total', 0):.0f}")
            if server is not None:
                ok, health = await asyncio.to_thread(server.healthy)
                res["healthy_after"] = ok
                if not ok:
                    res["health"] = health
                    log(f"{name}: server UNHEALTHY after {wl.name}: {health}")
            out["workloads"][wl.name] = res
    except Exception as e:  # noqa: BLE001  (a broken configuration must not sink the others)
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"{name}: FAILED: {out['error']}")
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
            out["stop_s"] = server.stop_s
            out["killed"] = server.killed
            out["server_log"] = server.log.name
            if out.get("error") or any(not w.get("healthy_after", True) for w in out["workloads"].values()):
                out["server_log_tail"] = server.tail(6000)
    return out


# ---------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def _ms(d: dict | None, k: str) -> str:
    v = None if d is None else d.get(k)
    return "–" if v is None else f"{v * 1000:.0f}"


def _n(v: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def write_report(result: dict[str, Any], prefix: str) -> None:
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    md = render_markdown(result, Path(prefix + ".md"))
    Path(prefix + ".md").write_text(md)
    try:
        render_plot(result, prefix + ".png")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")


def render_markdown(result: dict[str, Any], md_path: Path) -> str:
    m, a = result["machine"], result["args"]
    slo = result["slo"]
    runs = result["runs"]
    L: list[str] = []
    L.append("# Online serving: placement policies, disaggregated vs colocated (OpenAI HTTP API, CPU)")
    L.append("")
    L.append(f"Reproduce: `{result['command']}`")
    L.append("")
    if result["preset"] == "quick":
        L.append("**This is a `--quick` smoke run** (2 configurations, small workloads): shapes, not conclusions.")
        L.append("")
    L.append("| | |")
    L.append("|---|---|")
    L.append(f"| date | {result['date']} |")
    L.append(f"| machine | {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory']} RAM, GPU: {m.get('gpu', 'none')} ({m['platform']}) |")
    L.append(f"| software | python {m['python']}, torch {m['torch']}, ray {m['ray']}, httpx {m['httpx']}, git {m['git_commit']} |")
    if m.get("uncommitted_changes"):
        L.append(f"| uncommitted changes in the tree the servers ran from | {', '.join(m['uncommitted_changes'])} |")
    L.append(f"| model | {MODEL} (the embedded GGUF, float32 on CPU), block size 16 |")
    L.append(f"| workers | every worker a Ray actor with 1 CPU and 1 torch thread; KV cache {a['kv_cache_gb']} GB per worker; "
             "prefix caching on; KV between prefill and decode workers over UCX |")
    L.append(f"| SLO (goodput) | TTFT ≤ {slo['ttft_s']} s and TPOT ≤ {slo['tpot_s']} s per request, and no error |")
    L.append(f"| per-request timeout | {a['request_timeout']} s |")
    if a.get("hotfix_applied"):
        L.append("| server patch | **runtime patch applied** (an option this script had then): the servers ran with a runtime patch of "
                 "`AsyncEngine.run_on_engine` (workers/async_engine.py) so that a cancelled engine call no longer "
                 "crashes the engine thread (see the note below) |")
    L.append(f"| load average (1/5/15 min) before / after the run | {result['loadavg_start']} / {result['loadavg_end']} |")
    if result.get("quiet_wait"):
        L.append(f"| 1-min load while waiting for a quiet machine | {result['quiet_wait']} |")
    L.append(f"| run time | {result['run_s']:.0f} s (server start-ups: "
             + ", ".join(f"{r['config']} {r.get('startup_s') or 0:.0f} s" for r in runs) + ") |")
    L.append("")
    if a.get("hotfix_applied"):
        L.append("**Note (server patch):** without it, the decode worker's engine thread crashed within the first "
                 "few requests of every disaggregated server in development runs: the router sends `abort` for a "
                 "request that already finished, that RPC is cancelled, and `run_on_engine` then calls `set_result` "
                 "on a cancelled `concurrent.futures.Future`; the `InvalidStateError` escapes into the engine loop, "
                 "the worker is marked down and never restarted, and every later request fails with 'no decode "
                 "worker is up'. The patch only dropped the result of a call nobody waits "
                 "for, the same change that is now in workers/async_engine.py (the engine no longer crashes there), "
                 "so the option is gone and these timings stand for the current code.")
        L.append("")
    if result.get("note"):
        L.append(f"**Note:** {result['note']}")
        L.append("")
    busy = max(result["loadavg_start"][0], max((w["loadavg_before"][0] for r in runs for w in r["workloads"].values()), default=0))
    if busy > 2.0:
        L.append(f"**Note:** the machine was shared while this ran (1-minute load average up to {busy:.1f} before a "
                 "workload, on 2 cores): absolute latencies are inflated and noisy, and other jobs' bursts can "
                 "hit one configuration and not another.")
        L.append("")
    L.append(f"![serving]({md_path.stem}.png)")
    L.append("")
    L.extend(summary_lines(result))
    L.append("## Configurations")
    L.append("")
    L.append("| config | what | command |")
    L.append("|---|---|---|")
    for r in runs:
        L.append(f"| {r['config']} | {r.get('label', '')} | `{r.get('command', '(--url)')}` |")
    L.append("")
    L.append("The three policies run on the same 2 prefill + 1 decode workers (3 single-thread workers on 2 cores); "
             "disaggregated 1P+1D and colocated ×2 run on the same number of workers (2), one way each.")
    L.append("")
    L.append("## Workloads")
    L.append("")
    for name, wl in result["workloads"].items():
        L.append(f"* **{name}**: {wl['description']}.")
        if wl.get("stats"):
            s = wl["stats"]
            L.append(f"  Offline: {s['requests']} requests from {s.get('conversations')} conversations, "
                     f"{s['input_tokens_total']} prompt tokens (mean {s['input_tokens_mean']:.0f}, max {s['input_tokens_max']}; "
                     f"{s.get('inputs_capped', '?')} cut at the cap), "
                     f"{s['output_tokens_total']} output tokens; trace span {s['trace_span_s']:.0f} s replayed in "
                     f"{s['replay_span_s']:.1f} s; one unbounded prefix cache seeing them in order would hit "
                     f"{s['ideal_hit_tokens']} tokens ({s['ideal_hit_share']:.0%}): the ceiling for any placement.")
    L.append("")
    for name in result["workloads"]:
        L.append(f"## {name}")
        L.append("")
        L.append("Latency (ms; percentiles over requests, ITL over all inter-chunk gaps pooled):")
        L.append("")
        L.append("| config | ok / sent | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p90 | TPOT p99 | ITL p50 | ITL p90 | ITL p99 | E2E p50 | out tok/s | goodput req/s | in SLO | 1-min load before / after |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            w = r["workloads"].get(name)
            if w is None:
                L.append(f"| {r['config']} | failed: {r.get('error', 'not run')} |" + " |" * 14)
                continue
            s = w["summary"]
            L.append(
                f"| {r['config']} | {s['ok']} / {s['requests']} | {_ms(s['ttft_s'], 'p50')} | {_ms(s['ttft_s'], 'p90')} | "
                f"{_ms(s['ttft_s'], 'p99')} | {_ms(s['tpot_s'], 'p50')} | {_ms(s['tpot_s'], 'p90')} | {_ms(s['tpot_s'], 'p99')} | "
                f"{_ms(s['itl_s'], 'p50')} | {_ms(s['itl_s'], 'p90')} | {_ms(s['itl_s'], 'p99')} | {_ms(s['e2e_s'], 'p50')} | "
                f"{_n(s['output_tok_per_s'], '{:.1f}')} | {_n(s['goodput_req_per_s'], '{:.2f}')} | "
                f"{s['good']}/{s['requests']} | {w['loadavg_before'][0]:.1f} / {w['loadavg_after'][0]:.1f} |"
            )
        L.append("")
        L.append("Prefix reuse (tokens; engine counters are /metrics deltas over the workload, summed over workers):")
        L.append("")
        L.append("| config | prompt tokens (usage) | prefill computed (engine) | prefix-hit, prefill side (engine) | prefix-hit, decode side (engine) | router predicted hits | cached_tokens (usage) | hit share (engine, prefill side) | decisions per worker | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for r in runs:
            w = r["workloads"].get(name)
            if w is None:
                continue
            s, e = w["summary"], w["engine"]
            hits = prefill_side_hits(e)
            computed = e["prefill_computed"].get("total", 0.0)
            share = hits / (hits + computed) if hits + computed else None
            dec = ", ".join(f"{k} {v:.0f}" for k, v in e["decisions"].items() if k != "total" and v)
            errs = ", ".join(f"{k} ×{v}" for k, v in s["error_kinds"].items()) or "0"
            if not w.get("healthy_after", True):
                errs += " (server unhealthy afterwards)"
            L.append(
                f"| {r['config']} | {s['prompt_tokens']} | {computed:.0f} | {hits:.0f} | {e['prefix_hit'].get('decode', 0):.0f} | "
                f"{e['predicted_hit'].get('total', 0):.0f} | {s['cached_tokens_reported']} | {_n(share, '{:.0%}')} | {dec} | {errs} |"
            )
        L.append("")
    failed = [r for r in runs if r.get("error")]
    if failed:
        L.append("## Failures")
        L.append("")
        for r in failed:
            L.append(f"* {r['config']}: {r['error']}")
        L.append("")
    L.extend(trace_reuse_lines(result))
    L.append("Raw per-request records (TTFT, every ITL gap, usage, send lag) and the metric deltas per worker are in "
             f"`{md_path.stem}.json`.")
    L.append("")
    L.extend(reading_section(md_path))
    return "\n".join(L)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Per workload: prefill tokens computed (engine counters, every worker, the decode
    worker's local prefills included) and TTFT p90 per configuration, round_robin's and
    least_loaded's computed tokens over kv_aware's, and for a trace replay the one-cache
    ceiling's computed tokens (prompt tokens minus its hits)."""
    configs = [r["config"] for r in result["runs"]]
    if not configs:
        return []
    rows = []
    for name, wl in result["workloads"].items():
        computed, ttft = {}, {}
        for c in configs:
            w = _get(result, c, name)
            if w is not None:
                computed[c] = w["engine"]["prefill_computed"].get("total", 0.0)
                ttft[c] = (w["summary"].get("ttft_s") or {}).get("p90")
        kv = computed.get("kv_aware")
        ratio = {c: (computed[c] / kv if kv else None) for c in ("round_robin", "least_loaded") if c in computed}
        stats = wl.get("stats") or {}
        ceiling = stats["input_tokens_total"] - stats["ideal_hit_tokens"] if "ideal_hit_tokens" in stats else None
        rows.append([name, *(_n(computed.get(c)) for c in configs),
                     *(_n(ratio.get(c), "{:.2f}x") for c in ("round_robin", "least_loaded")),
                     _n(ceiling), _n(kv / ceiling if kv is not None and ceiling else None, "{:.2f}"),
                     *(_ms({"p90": ttft.get(c)}, "p90") for c in configs)])
    header = ["workload", *(f"computed: {c}" for c in configs), "round_robin / kv_aware", "least_loaded / kv_aware",
              "ceiling computed", "kv_aware / ceiling", *(f"TTFT p90 ms: {c}" for c in configs)]
    return ["## Summary", "",
            "Prefill tokens computed (engine counters, all workers, a decode worker's local prefills included) and "
            "TTFT p90 per configuration; the ceiling is one unbounded prefix cache seeing the prompts in order.", "",
            *md_table(header, rows, "l" + "r" * (len(header) - 1)), ""]


def _get(result: dict, config: str, wl: str) -> dict | None:
    for r in result["runs"]:
        if r["config"] == config:
            return r["workloads"].get(wl)
    return None


def trace_reuse_diagnostic(result: dict[str, Any]) -> dict[str, dict[str, int]] | None:
    """Per configuration, over the trace replay's follow-up requests (those sharing >= 2
    blocks with an earlier one): how many were sent after that earlier request had its
    first token (its prompt's blocks stored on its prefill worker, so the router could
    know), and how many of those still got fewer cached tokens than the shared prefix.
    The workload is rebuilt from its stored parameters (deterministic)."""
    wl = result["workloads"].get("mooncake_replay")
    if wl is None:
        return None
    try:
        params = {k: v for k, v in wl["params"].items() if k != "block_tokens"}
        params["token_range"] = tuple(params.get("token_range", (1000, 40000)))
        rebuilt = W.mooncake_replay(**params)
    except Exception as e:  # noqa: BLE001  (no trace file here: no diagnostic)
        log(f"trace diagnostic skipped: {e}")
        return None
    bs = 16
    prompts = {s.turns[0].meta["trace_index"]: s.turns[0].body["prompt"] for s in rebuilt.sessions}
    order = [s.turns[0].meta["trace_index"] for s in rebuilt.sessions]

    def shared_blocks(a: list[int], b: list[int]) -> int:
        n = 0
        while (n + 1) * bs <= min(len(a), len(b)) and a[n * bs:(n + 1) * bs] == b[n * bs:(n + 1) * bs]:
            n += 1
        return n

    out = {}
    for run in result["runs"]:
        w = run["workloads"].get("mooncake_replay")
        if w is None:
            continue
        recs = {r["meta"].get("trace_index"): r for r in w["records"]}
        d = {"followups": 0, "parent_ready": 0, "missed_when_ready": 0, "missed_tokens_when_ready": 0}
        for j, i in enumerate(order):
            best, parent = 0, None
            for k in order[:j]:
                b = shared_blocks(prompts[i], prompts[k])
                if b > best:
                    best, parent = b, k
            rec, prec = recs.get(i), recs.get(parent)
            if best < 2 or rec is None or prec is None or not rec["ok"] or not prec["ok"]:
                continue
            d["followups"] += 1
            if prec["sent_s"] + prec["ttft_s"] < rec["sent_s"]:
                d["parent_ready"] += 1
                expect = min(best * bs, (len(prompts[i]) - 1) // bs * bs)
                if (rec["cached_tokens"] or 0) < expect:
                    d["missed_when_ready"] += 1
                    d["missed_tokens_when_ready"] += expect - (rec["cached_tokens"] or 0)
        out[run["config"]] = d
    return out


def trace_reuse_lines(result: dict[str, Any]) -> list[str]:
    """The trace replay's follow-ups per configuration (``trace_reuse_diagnostic``), as a table."""
    diag = result.get("trace_diagnostic") or trace_reuse_diagnostic(result)
    if not diag:
        return []
    n = next(iter(diag.values()))["followups"]
    return ["## Trace follow-ups (mooncake_replay)", "",
            f"{n} requests share at least 2 blocks with an earlier one. Counted: those sent after the earlier "
            "request's first token (its blocks already stored, so the router's index could know), and of those, "
            "the ones that got fewer cached tokens than the shared prefix.", "",
            *md_table(["config", "sent after the earlier one's first token", "missed", "tokens missed"],
                      [[c, d["parent_ready"], d["missed_when_ready"], d["missed_tokens_when_ready"]]
                       for c, d in diag.items()], "lrrr"), ""]


def render_plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    import numpy as np

    wls = list(result["workloads"])
    configs = [r["config"] for r in result["runs"]]
    fig, axes = plt.subplots(len(wls), 3, figsize=(16, 4.2 * len(wls)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, wl in enumerate(wls):
        x = np.arange(len(configs))
        # TTFT percentiles
        ax = axes[i][0]
        for j, q in enumerate(("p50", "p90", "p99")):
            vals = [((_get(result, c, wl) or {}).get("summary", {}).get("ttft_s", {}) or {}).get(q) for c in configs]
            ax.bar(x + (j - 1) * 0.27, [v or 0 for v in vals], 0.27, label=f"TTFT {q}", color=colors[j])
        ax.axhline(result["slo"]["ttft_s"], color="k", ls="--", lw=0.8, label="SLO")
        ax.set_title(f"{wl}: TTFT (s)")
        ax.set_xticks(x, configs, rotation=20, fontsize=8)
        ax.legend(fontsize=7)
        # TPOT / ITL
        ax = axes[i][1]
        for j, (metric, q) in enumerate((("tpot_s", "p50"), ("tpot_s", "p90"), ("itl_s", "p50"), ("itl_s", "p99"))):
            vals = [((_get(result, c, wl) or {}).get("summary", {}).get(metric, {}) or {}).get(q) for c in configs]
            ax.bar(x + (j - 1.5) * 0.2, [(v or 0) * 1000 for v in vals], 0.2, label=f"{metric[:-2].upper()} {q}", color=colors[j + 3])
        ax.axhline(result["slo"]["tpot_s"] * 1000, color="k", ls="--", lw=0.8, label="TPOT SLO")
        ax.set_title(f"{wl}: TPOT / ITL (ms)")
        ax.set_xticks(x, configs, rotation=20, fontsize=8)
        ax.legend(fontsize=7)
        # prefill tokens: computed vs hit (engine), predicted hits
        ax = axes[i][2]
        comp = [((_get(result, c, wl) or {}).get("engine", {}).get("prefill_computed", {}) or {}).get("total", 0) for c in configs]
        hits = [prefill_side_hits((_get(result, c, wl) or {}).get("engine", {})) for c in configs]
        pred = [((_get(result, c, wl) or {}).get("engine", {}).get("predicted_hit", {}) or {}).get("total", 0) for c in configs]
        ax.bar(x, comp, 0.5, label="prefill computed", color=colors[0])
        ax.bar(x, hits, 0.5, bottom=comp, label="prefix-cache hits (prefill side)", color=colors[2])
        ax.scatter(x, np.array(comp) + np.array(pred), marker="_", s=400, color="k", label="computed + router-predicted hits", zorder=3)
        ax.set_title(f"{wl}: prompt tokens (engine counters)")
        ax.set_xticks(x, configs, rotation=20, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"kvrelay serving benchmark ({result['preset']}), SmolLM2-135M on {result['machine']['logical_cpus']} CPU cores; "
                 f"SLO TTFT ≤ {result['slo']['ttft_s']} s, TPOT ≤ {result['slo']['tpot_s']} s", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    wls = build_workloads(args)
    result: dict[str, Any] = {
        "command": "python -m bench.serving " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "preset": args.preset,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(("torch", "ray", "httpx")),
        "args": {k: v for k, v in vars(args).items() if k not in ("render",)},
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "workloads": {w.name: {"description": w.description, "params": w.params, "stats": w.stats} for w in wls},
        "note": args.note,
        "runs": [],
    }
    if args.wait_quiet > 0:
        result["quiet_wait"] = (await asyncio.to_thread(wait_quiet, args.wait_quiet, args.quiet_load, 60.0, log))["loads"]
    result["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    configs = args.configs if args.url is None else ["external"]
    for name in configs:
        result["runs"].append(await run_config(name, wls, args, slo))
    result["run_s"] = time.monotonic() - t0
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def best_placement_estimate(prompts: list[list[int]], block_size: int, capacity_blocks: int,
                            max_nodes: int = 2_000_000) -> int | None:
    """The fewest prompt tokens any placement on two workers computes in
    ``W.lru_placement_estimate``'s model (prompts one at a time in arrival order, an LRU
    of full blocks per worker): every assignment, by branch and bound (a partial one is
    dropped once its tokens plus the one-unbounded-cache ceiling's for the rest reach
    the best found; the affine rule's total is the first bound). A clairvoyant bound:
    it knows which prefixes come back. None past ``max_nodes`` search nodes."""
    from collections import OrderedDict

    keys = [[tuple(p[: (b + 1) * block_size]) for b in range(len(p) // block_size)] for p in prompts]
    seen: set = set()
    floor = []  # per prompt: what the unbounded cache computes of it
    for p, ks in zip(prompts, keys):
        m = 0
        while m < len(ks) and ks[m] in seen:
            m += 1
        floor.append(len(p) - min(m, max(0, len(p) - 1) // block_size) * block_size)
        seen.update(ks)
    rest = [sum(floor[i:]) for i in range(len(prompts) + 1)]
    best = [W.lru_placement_estimate(prompts, block_size, 2, capacity_blocks, "affine") + 1]
    nodes = [0]

    def search(i: int, caches: tuple, cost: int) -> None:
        nodes[0] += 1
        if nodes[0] > max_nodes or cost + rest[i] >= best[0]:
            return
        if i == len(prompts):
            best[0] = cost
            return
        p, ks = prompts[i], keys[i]
        usable = max(0, len(p) - 1) // block_size
        options = []
        for w in (0, 1) if i else (0,):  # the workers are interchangeable: the first goes to 0
            m = 0
            while m < min(len(ks), usable) and ks[m] in caches[w]:
                m += 1
            options.append((len(p) - m * block_size, w))
        for computed, w in sorted(options):  # the cheaper worker first: good bounds early
            cache = OrderedDict(caches[w])
            for k in ks:
                cache[k] = None
                cache.move_to_end(k)
            while len(cache) > capacity_blocks:
                cache.popitem(last=False)
            search(i + 1, (cache, caches[1]) if w == 0 else (caches[0], cache), cost + computed)

    search(0, (OrderedDict(), OrderedDict()), 0)
    return None if nodes[0] > max_nodes else best[0]


def kv_sweep(args: argparse.Namespace, sizes: list[int], block_size: int = 16) -> str:
    """A markdown table: the trace workload's prompts (in arrival order) through
    ``W.lru_placement_estimate`` for round_robin and the affine (kv_aware-like) rule at
    each KV size, and the best any placement could do there (``best_placement_estimate``),
    against the one-unbounded-cache ceiling."""
    wl = next(w for w in build_workloads(args) if w.name.startswith("mooncake"))
    prompts = [s.turns[0].body["prompt"] for s in sorted(wl.sessions, key=lambda s: s.start_s)]
    hits, total = W.ideal_prefix_hits(prompts, block_size)
    ceiling = total - hits
    rows = []
    for b in sizes:
        rr = W.lru_placement_estimate(prompts, block_size, 2, b, "round_robin")
        af = W.lru_placement_estimate(prompts, block_size, 2, b, "affine")
        best = best_placement_estimate(prompts, block_size, b)
        rows.append([b, af, f"{af / ceiling:.2f}", rr, f"{rr / af:.2f}x", "-" if best is None else best,
                     "-" if best is None else f"{best / ceiling:.2f}", "-" if best is None else f"{rr / best:.2f}x"])
    head = (f"{len(prompts)} requests, {total} prompt tokens, ceiling computes {ceiling} "
            f"({len({tuple(p[:(i + 1) * block_size]) for p in prompts for i in range(len(p) // block_size)})} distinct blocks)\n\n")
    return head + "\n".join(md_table(["KV blocks per worker", "affine computed", "affine / ceiling",
                                      "round_robin computed", "round_robin / affine", "best placement computed",
                                      "best / ceiling", "round_robin / best"], rows, "rrrrrrrr"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        write_report(result, args.render.removesuffix(".json"))
        log(f"wrote {args.render.removesuffix('.json')}.md/.png")
        return 0
    if args.kv_sweep:
        print(kv_sweep(args, [int(b) for b in args.kv_sweep.split(",")]))
        return 0
    result = asyncio.run(main_async(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    log(f"wrote {args.out}.json/.md/.png in {result['run_s']:.0f}s")
    return 0 if all(not r.get("error") for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
