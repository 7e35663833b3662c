"""Chaos: mixed load on a live cluster (real Ray actors, real UCX, SmolLM2) while a
random prefill or decode worker is SIGKILLed every ``--kill-every`` seconds.

    python -m bench.chaos                           # 300 s, a kill every ~30 s
    python -m bench.chaos --duration 60 --tag short # the CI-sized run
    python -m bench.chaos --prefill-workers 1 --decode-workers 2

Pools: those ``kvrelay serve`` picks on this host (``ClusterConfig.sized_for_host``: 2
prefill + 1 decode workers on 2-4 cores) unless given.

The router runs in this process (RouterService: the policy, the admission queue, the
retry rules), so the bench sees every request's outcome and the cluster's counters.
Load: multi-turn chat (greedy), long prompts (greedy), seeded sampling with n=2, and
clients that disconnect after a few tokens. Every request ends within ``--deadline``
as completed, a clean error (by type), cancelled (the client left), or hung (the
deadline passed). Afterwards, with no kills: every greedy and seeded request that
completed is re-run alone and compared token for token (lost, repeated or changed
tokens show up as "differs"), every worker's KV returns to idle, and the router's
index equals every worker's own snapshot. Writes ``bench/results/chaos{tag}.md`` and
``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import dist, machine_info, md_table, pyplot, reading_section

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Job:
    kind: str  # chat | long | seeded_n2 | disconnect
    prompt: list[int]
    params: list  # SamplingParams per choice
    verify: bool  # compare with an undisturbed run afterwards
    outcome: str = "pending"
    tokens: dict[int, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    started_s: float = 0.0  # offset from the start of the load


def _passage(i: int, n: int) -> str:
    from tests.integration.prompts import long_text

    return f"[document {i}] " + long_text(n)


def make_job(rng: random.Random, tok, i: int):
    from workers.sampling_params import SamplingParams

    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kind = rng.choice(["chat", "chat", "long", "seeded_n2", "disconnect"])
    if kind == "chat":
        msgs = [{"role": "user", "content": f"Conversation {i}: tell me about topic {rng.randint(0, 50)}."}]
        return Job(kind, tok.apply_chat_template(msgs), [greedy], True)
    if kind == "long":
        return Job(kind, tok.encode(_passage(i, rng.choice([1500, 3000]))), [SamplingParams(max_tokens=8, temperature=0.0)], True)
    if kind == "seeded_n2":
        seed = rng.randint(0, 10**6)
        ps = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=seed + c, ignore_eos=True) for c in range(2)]
        return Job(kind, tok.apply_chat_template([{"role": "user", "content": f"Invent a name, #{i}."}]), ps, True)
    return Job(kind, tok.apply_chat_template([{"role": "user", "content": f"Write a long story #{i}."}]),
               [SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)], False)


async def run_job(service, job: Job, deadline_s: float) -> None:
    from router.service import RequestResult

    t0 = time.monotonic()

    async def go():
        stream = service.run(job.prompt, job.params, [], RequestResult(len(job.prompt)))
        try:
            async for ev in stream:
                job.tokens.setdefault(ev.index, []).extend(ev.token_ids)
                if job.kind == "disconnect" and sum(map(len, job.tokens.values())) >= 3:
                    job.outcome = "cancelled"
                    return
        finally:
            await stream.aclose()
        job.outcome = "completed"

    try:
        await asyncio.wait_for(go(), deadline_s)
    except asyncio.TimeoutError:
        job.outcome = "hung"
    except Exception as e:  # a clean error: the API would answer it in OpenAI's envelope
        job.outcome = f"error: {type(e).__name__}"
    job.seconds = time.monotonic() - t0


async def chaos(args) -> dict:
    from cluster.config import ClusterConfig
    from cluster.worker_api import WorkerAPI
    from router.service import RouterService

    pools = {"max_restarts": -1}  # the pool sizes `kvrelay serve` would pick here, unless given
    if args.prefill_workers:
        pools["prefill_workers"] = args.prefill_workers
    if args.decode_workers:
        pools["decode_workers"] = args.decode_workers
    cfg = ClusterConfig.build({
        "engine": {"kv_cache_memory_gb": 0.1, "chunk_size": 256, "max_num_batched_tokens": 512},
        "pools": pools,
        "deadlines": {"health_interval_s": 0.5, "transfer_s": 20.0, "token_s": 30.0, "reserve_s": 10.0, "prefill_s": 60.0},
        "admission": {"queue_timeout_s": 120.0, "max_attempts": 4},
        "metrics": {"enabled": False},
    }).sized_for_host(os.cpu_count())
    service = RouterService(cfg)
    t_start = time.monotonic()
    await service.start()
    print(f"cluster up in {time.monotonic() - t_start:.0f}s", flush=True)
    rng = random.Random(args.seed)
    tok = service.tokenizer
    jobs: list[Job] = []
    kills: list[tuple[float, str]] = []
    running: set[asyncio.Task] = set()
    t0 = time.monotonic()
    next_kill = t0 + args.kill_every * rng.uniform(0.5, 1.0)
    i = 0
    while time.monotonic() - t0 < args.duration:
        if len(running) < args.concurrency:
            job = make_job(rng, tok, i)
            i += 1
            job.started_s = time.monotonic() - t0
            jobs.append(job)
            task = asyncio.ensure_future(run_job(service, job, args.deadline))
            running.add(task)
            task.add_done_callback(running.discard)
        if time.monotonic() >= next_kill:
            states = [w for p in service.cluster.pools for w in p.workers if w.up and w.health is not None]
            if states:
                victim = rng.choice(states)
                os.kill(victim.health.pid, signal.SIGKILL)
                kills.append((round(time.monotonic() - t0, 1), victim.handle.name))
                print(f"t={kills[-1][0]}s SIGKILL {victim.handle.name}", flush=True)
            next_kill = time.monotonic() + args.kill_every * rng.uniform(0.7, 1.3)
        await asyncio.sleep(0.2)
    await asyncio.gather(*running, return_exceptions=True)
    load_s = time.monotonic() - t0

    # ---- afterwards: everyone back, idle, index exact, outputs identical ---------------
    for pool in service.cluster.pools:
        for w in pool.workers:
            await pool.wait_up(w.handle.index, 300)
    idle = {}
    deadline = time.monotonic() + 120
    while True:
        hs = {w.handle.name: await w.handle.call(WorkerAPI.health, timeout_s=10) for p in service.cluster.pools for w in p.workers}
        idle = {n: (h.running, h.waiting, round(h.kv_usage, 4)) for n, h in hs.items()}
        if all(v == (0, 0, 0.0) for v in idle.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    await service.pump_events()
    index_ok = {}
    for role, states in service.cluster.worker_states().items():
        for w in states:
            snap = await w.handle.call(WorkerAPI.kv_snapshot, timeout_s=10)
            index_ok[w.handle.name] = service.indexes[role].blocks_of(w.handle.name) == frozenset(h for h, _ in snap.blocks)
    verdict = Counter()
    for job in jobs:
        if job.outcome != "completed" or not job.verify:
            continue
        ref = Job(job.kind, job.prompt, job.params, True)
        await run_job(service, ref, args.deadline)
        verdict["identical" if ref.tokens == job.tokens else "differs"] += 1
    c = service.cluster.counters
    stats = await service.cluster.worker_stats()
    recomputes = sum(s.get("kv_recomputes", 0) for s in stats if "error" not in s)
    await service.stop()
    outcomes = Counter(j.outcome for j in jobs)
    return {
        "duration_s": round(load_s, 1), "kill_every_s": args.kill_every, "concurrency": args.concurrency,
        "deadline_s": args.deadline, "pools": {"prefill": cfg.pools.prefill_workers, "decode": cfg.pools.decode_workers},
        "requests": len(jobs), "by_kind": dict(Counter(j.kind for j in jobs)),
        "outcomes": dict(outcomes), "verified_after": dict(verdict), "kills": kills,
        "migrations": c.migrations, "retries": c.decode_retries, "prefill_failures": c.prefill_failures,
        "kv_recomputes_since_last_restart": recomputes,
        "admission_rejected": dict(service.cluster.admission.rejected),
        "idle_after": idle, "index_matches_snapshot": index_ok,
        "max_seconds": round(max((j.seconds for j in jobs), default=0.0), 1),
        "load_average": os.getloadavg(),
        "machine": machine_info(),
        "timeline": [(round(j.started_s, 2), round(j.seconds, 2), j.kind, j.outcome) for j in jobs],
        "seconds_by_outcome": {k: dist([j.seconds for j in jobs if _bucket(j.outcome) == k])
                               for k in sorted({_bucket(j.outcome) for j in jobs})},
    }


def _bucket(outcome: str) -> str:
    return "error" if outcome.startswith("error") else outcome


def plot(result: dict, path: Path) -> None:
    """Every request as a bar from its start to its end, by outcome; the kills as lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 5))
    colors = {"completed": "tab:green", "cancelled": "tab:blue", "error": "tab:orange", "hung": "tab:red"}
    ax.set_ylim(-5, len(result["timeline"]) * 1.12)
    for i, (start, secs, _kind, outcome) in enumerate(result["timeline"]):
        ax.plot([start, start + secs], [i, i], color=colors.get(_bucket(outcome), "black"), lw=1.2)
    fast = [(start, i) for i, (start, secs, _kind, outcome) in enumerate(result["timeline"]) if _bucket(outcome) != "completed" and secs < 0.5]
    ax.scatter([t for t, _ in fast], [i for _, i in fast], marker="|", s=12, color="tab:orange")  # too short for a bar
    for t, name in result["kills"]:
        ax.axvline(t, color="black", ls="--", lw=0.8)
        ax.text(t, len(result["timeline"]) * 1.01, name, rotation=90, fontsize=7, va="bottom", ha="center")
    for k, c in colors.items():
        ax.plot([], [], color=c, label=k)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("request (in order of start)")
    ax.set_title("chaos: each request from start to end; dashed: SIGKILL of a worker")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pools_text(result: dict) -> str:
    p = result.get("pools", {"prefill": 1, "decode": 2})  # runs before the pools were recorded had 1 + 2
    return f"{p['prefill']} prefill + {p['decode']} decode workers"


def write(result: dict, tag: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"chaos{tag}.json").write_text(json.dumps(result, indent=2))
    o, v = result["outcomes"], result["verified_after"]
    rows = [("requests", result["requests"]), ("completed", o.get("completed", 0)),
            ("  of them verified identical to an undisturbed run", v.get("identical", 0)),
            ("  of them different (lost / repeated / changed tokens)", v.get("differs", 0)),
            ("cancelled by the client (disconnects)", o.get("cancelled", 0)),
            ("clean errors", sum(n for k, n in o.items() if k.startswith("error"))),
            ("hung (past the deadline)", o.get("hung", 0)),
            ("migrations (decode worker died mid-stream)", result["migrations"]),
            ("retries (before the first token)", result["retries"]),
            ("prefill failures (decode worker recomputed)", result["prefill_failures"]),
            ("workers SIGKILLed", len(result["kills"])),
            ("every worker's KV idle afterwards", all(x == [0, 0, 0.0] or x == (0, 0, 0.0) for x in result["idle_after"].values())),
            ("router index == every worker's snapshot", all(result["index_matches_snapshot"].values()))]
    md = [f"# Chaos run{(' ' + tag.strip('-')) if tag else ''}", "",
          f"`python -m bench.chaos --duration {result['duration_s']:.0f} --kill-every {result['kill_every_s']}` "
          f"({result['concurrency']} concurrent clients, per-request deadline {result['deadline_s']} s; "
          f"{pools_text(result)} over UCX; load average at the end {result['load_average'][0]:.1f})", "",
          "| what | count |", "| --- | ---: |", *[f"| {k} | {v} |" for k, v in rows], "",
          f"Errors by type: {json.dumps({k: n for k, n in o.items() if k.startswith('error')})}; "
          f"requests by kind: {json.dumps(result['by_kind'])}; kills (s, worker): {result['kills']}; "
          f"longest request {result['max_seconds']} s.", ""]
    if "timeline" in result:
        plot(result, RESULTS / f"chaos{tag}.png")
        by = result["seconds_by_outcome"]
        md += [*md_table(["outcome", "requests", "p50 (s)", "p99 (s)", "max (s)"],
                         [(k, d["n"], f"{d['p50']:.2f}", f"{d['p99']:.2f}", f"{d['max']:.2f}") for k, d in by.items()],
                         "lrrrr"), "",
               f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cpus']} CPUs, commit "
               f"{result['machine']['git_commit']}.", "", f"![chaos timeline](chaos{tag}.png)", "",
               *reading_section(RESULTS / f"chaos{tag}.md")]
    path = RESULTS / f"chaos{tag}.md"
    path.write_text("\n".join(md))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--kill-every", type=float, default=30.0, help="mean seconds between SIGKILLs")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--prefill-workers", type=int, default=0, help="0: what kvrelay serve picks on this host")
    ap.add_argument("--decode-workers", type=int, default=0, help="0: what kvrelay serve picks on this host")
    ap.add_argument("--deadline", type=float, default=240.0, help="per-request deadline (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. -short)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(chaos(args))
    path = write(result, args.tag)
    print(path.read_text())
    bad = result["outcomes"].get("hung", 0) + result["verified_after"].get("differs", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
