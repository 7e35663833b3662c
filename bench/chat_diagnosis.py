"""Why does kv_aware (not) win on multi-turn chat? One placement policy, real workers
(Ray actors, UCX, SmolLM2), the router's own ``RouterService`` driven in process, and a
record per placement decision: what each worker held of the prompt (the index's match,
what the policy saw), the cost of each candidate, the queue in tokens, the chosen
workers, and what the engine then realized (cached tokens of the first output).

    python -m bench.chat_diagnosis --policy kv_aware --conversations 6 --turns 10 --out /tmp/diag-kv.json
    python -m bench.chat_diagnosis --policy round_robin ...

Prints a summary (prefill tokens computed per worker from the engines' counters, blocks
evicted per worker from their KV events, predicted vs realized hits, how often a turn
went to the worker that held its conversation's previous turn, and how many prompt
tokens the decode worker held that the chosen prefill worker did not).
A diagnostic, not a benchmark: bench/serving.py measures over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import defaultdict
from typing import Any

from bench.loadgen import poisson_arrivals
from bench.workloads import _QUESTIONS, words
from cluster.block_hash import hash_blocks
from cluster.config import ClusterConfig
from router.service import RequestResult, RouterService
from workers.sampling_params import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chat_diagnosis", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="kv_aware")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--doc-words", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--rate", type=float, default=0.5, help="conversation starts per second (Poisson)")
    p.add_argument("--think", type=float, default=0.5)
    p.add_argument("--prefill-workers", type=int, default=2)
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="run the workload this many times on the same workers "
                   "(repeat i: seed + i), as bench/serving.py --repeats does")
    p.add_argument("--out", default=None, help="write every decision record here (JSON)")
    return p.parse_args(argv)


def build_config(args) -> ClusterConfig:
    import yaml

    raw: dict[str, Any] = {
        "engine": {"kv_cache_memory_gb": args.kv_cache_gb},
        "pools": {"prefill_workers": args.prefill_workers, "decode_workers": 1},
        "router": {"policy": args.policy, "event_poll_s": 0.05},
        "metrics": {"enabled": False},
    }
    for kv in args.set:
        key, value = kv.split("=", 1)
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    return ClusterConfig.build(raw)


async def run(args) -> dict[str, Any]:
    svc = RouterService(build_config(args))
    await svc.start()
    removed: dict[str, int] = defaultdict(int)
    apply_many = {role: idx.apply_many for role, idx in svc.indexes.items()}

    def counting(role):
        def wrapped(events):
            events = {w: list(evs) for w, evs in events.items()}
            for w, evs in events.items():
                removed[w] += sum(len(e.block_hashes) for e in evs if type(e).__name__ == "BlockRemoved")
            return apply_many[role](events)
        return wrapped

    for role, idx in svc.indexes.items():
        idx.apply_many = counting(role)
    seen: dict[int, dict[str, Any]] = {}
    choose = svc.policy.choose

    def recording(request, prefill, decode):
        placement = choose(request, prefill, decode)
        seen[id(placement)] = {
            "prefill_match": dict(request.prefill_match), "decode_match": dict(request.decode_match),
            "queued": {w.name: w.queued_tokens for w in prefill}, "live": {w.name: w.live_prefixes for w in prefill}, "prefill_load": {w.name: w.load for w in prefill},
            "decode_workers": {w.name: {"load": w.load, "free": w.free_blocks, "total": w.total_blocks} for w in decode},
            "costs": dict(placement.costs), "parts": dict(placement.parts),
        }
        return placement

    svc.policy.choose = recording
    runs = []
    for r in range(args.repeats):  # on the same workers: a later repeat starts with full caches
        runs.append(await one_run(svc, args, args.seed + r, seen, removed))
    await svc.stop()
    if args.repeats == 1:
        return runs[0]
    return {"args": vars(args), "repeats": runs}


async def one_run(svc: RouterService, args, seed: int, seen: dict, removed: dict) -> dict[str, Any]:
    removed0 = dict(removed)
    stats0 = {f"{s['role']}-{s['index']}": s for s in await svc.cluster.worker_stats()}
    starts = poisson_arrivals(args.conversations, args.rate, seed=seed + 11)
    records: list[dict[str, Any]] = []
    bs = svc.block_size
    t0 = time.monotonic()

    async def conversation(c: int) -> None:
        await asyncio.sleep(starts[c])
        rng = random.Random(f"chat-{seed}-{c}")
        system = ("You are a helpful assistant. Answer briefly, using only the document below.\n\n"
                  f"Document {c + 1}:\n{words(rng, args.doc_words)}")
        messages = [{"role": "system", "content": system}]
        last_p = None
        for t in range(args.turns):
            messages.append({"role": "user", "content": _QUESTIONS[(c + t) % len(_QUESTIONS)]})
            prompt = svc.tokenizer.apply_chat_template(messages)
            result = RequestResult(len(prompt))
            toks: list[int] = []
            sent = time.monotonic()
            ttft = None
            async for ev in svc.run(prompt, [SamplingParams(max_tokens=args.max_tokens, temperature=0.0)], [], result):
                if ttft is None and ev.token_ids:
                    ttft = time.monotonic() - sent
                toks += ev.token_ids
            pl = result.placement
            rec = {"conv": c, "turn": t, "sent_s": sent - t0, "prompt": len(prompt), "blocks": len(hash_blocks(prompt, bs)),
                   "prefill": pl.prefill, "decode": pl.decode, "cached": result.cached_tokens, "ttft": ttft,
                   "same_p_as_last_turn": last_p is None or pl.prefill == last_p, **seen.pop(id(pl), {})}
            records.append(rec)
            last_p = pl.prefill
            answer = svc.tokenizer.hf.decode(toks, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
            await asyncio.sleep(args.think)

    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    wall = time.monotonic() - t0
    await asyncio.sleep(1.5)
    stats1 = {f"{s['role']}-{s['index']}": s for s in await svc.cluster.worker_stats()}
    per_worker = {w: {k: stats1[w][k] - stats0[w].get(k, 0) for k in
                      ("prefill_computed_tokens", "prefix_cache_hit_tokens", "prompt_tokens", "kv_recomputes",
                       "preemptions")}
                  for w in stats1}
    for w in per_worker:
        per_worker[w]["blocks_removed"] = removed.get(w, 0) - removed0.get(w, 0)
    return {"args": {**vars(args), "seed": seed}, "wall_s": wall, "workers": per_worker, "records": records}


def summarize(res: dict[str, Any]) -> str:
    recs = res["records"]
    L = [f"policy {res['args']['policy']}: {len(recs)} requests in {res['wall_s']:.0f}s"]
    for w, s in sorted(res["workers"].items()):
        L.append(f"  {w}: computed {s['prefill_computed_tokens']}, hit {s['prefix_cache_hit_tokens']}, "
                 f"prompt {s['prompt_tokens']}, blocks removed {s['blocks_removed']}, recomputes {s['kv_recomputes']}, "
                 f"preemptions {s.get('preemptions', '-')}")
    bs = 16
    computed = sum(s["prefill_computed_tokens"] for s in res["workers"].values())
    # the chosen compute worker's match: the prefill worker's, or the decode worker's for a local prefill
    predicted = sum(min((r["prefill_match"].get(r["prefill"], 0) if r["prefill"] else r["decode_match"].get(r["decode"], 0))
                        * bs, r["prompt"]) for r in recs)
    realized = sum(r["cached"] for r in recs)
    best = sum(max(r["prefill_match"].values(), default=0) * bs for r in recs)
    dmore = sum(max(0, r["decode_match"].get(r["decode"], 0) - r["prefill_match"].get(r["prefill"], 0)) * bs
                for r in recs if r["prefill"])
    follow = [r for r in recs if r["turn"] > 0]
    L.append(f"  prefill computed total {computed}; predicted hits {predicted}, realized {realized}, best P's match {best}")
    L.append(f"  follow-up turns on their previous turn's P: {sum(r['same_p_as_last_turn'] for r in follow)}/{len(follow)}; "
             f"local prefills on the decode worker: {sum(1 for r in recs if r['prefill'] is None)}/{len(recs)}")
    L.append(f"  tokens the decode worker held beyond the chosen P's match (pairs only): {dmore}")
    ttfts = sorted(r["ttft"] for r in recs if r["ttft"] is not None)
    if ttfts:
        L.append(f"  TTFT p50 {ttfts[len(ttfts) // 2]:.2f}s p90 {ttfts[int(0.9 * (len(ttfts) - 1))]:.2f}s")
    return "\n".join(L)


def run_on_local_ray(run, args) -> dict[str, Any]:
    """``run(args)`` (a diagnosis) on a local Ray instance; its record is written to
    ``args.out`` when given. Shared with bench/serving_mooncake_diagnosis.py."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        res = asyncio.run(run(args))
    finally:
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    res = run_on_local_ray(run, parse_args(argv))
    for r in res.get("repeats", [res]):
        print(summarize(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
