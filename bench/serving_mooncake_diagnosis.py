"""Where does kv_aware lose hits on the Mooncake replay? The replay of bench/serving.py's
``--workloads trace`` (the same 24 requests, token-id prompts, arrival times), sent to
the router's own ``RouterService`` in process on real workers (Ray actors, UCX,
SmolLM2), with a record per placement decision: each prefill worker's match (index and
pending prefixes, what the policy saw), queued tokens, live conversations, every
candidate's cost, the chosen workers, and what the engine then realized; and every
block the workers evicted (their ``BlockRemoved`` events, timed).

    python -m bench.serving_mooncake_diagnosis --kv-cache-gb 0.1058 --out /tmp/mooncake-diag.json

Each request with a shared prefix (>= 2 blocks with an earlier request, as in
serving-mooncake.md's follow-up table) that got fewer cached tokens than that prefix is
classified, from the records alone:

* ``pending``: its earlier request had no first token yet when it was placed;
* ``cold share``: the shared prefix is under ``cold_match_share`` of its prompt, so the
  policy treats it as a new conversation (by design; router/placement.py);
* ``evicted before the decision``: the worker that computed the earlier request held
  less of it than the shared prefix at the decision (the index's match), and had
  reported some of those blocks removed;
* ``held but not in the index``: the same, with none of them reported removed;
* ``placed away``: that worker held it all, and the cost chose the other worker;
* ``evicted after the decision``: placed where it was held, realized less than predicted.

A diagnostic, not a benchmark (bench/serving.py measures over HTTP); like
bench/chat_diagnosis.py, which does this for multi-turn chat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import defaultdict
from typing import Any

from bench import workloads as W
from bench.chat_diagnosis import build_config, run_on_local_ray
from router.service import RequestResult, RouterService
from workers.sampling_params import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving_mooncake_diagnosis", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="kv_aware")
    p.add_argument("--prefill-workers", type=int, default=2)
    p.add_argument("--kv-cache-gb", type=float, default=0.1058)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--trace", default=str(W.TRACE_PATH))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    p.add_argument("--out", default=None, help="write every decision record here (JSON)")
    return p.parse_args(argv)


def replay(args) -> W.Workload:
    """bench/serving.py's trace workload (its defaults: 24 requests, /32, <= 512 tokens)."""
    return W.mooncake_replay(requests=args.requests, path=args.trace)


async def run(args) -> dict[str, Any]:
    svc = RouterService(build_config(args))
    await svc.start()
    t0 = time.monotonic()
    removed: dict[str, list[tuple[float, list]]] = defaultdict(list)  # worker -> (when, hashes)
    apply_many = {role: idx.apply_many for role, idx in svc.indexes.items()}

    def counting(role):
        def wrapped(events):
            events = {w: list(evs) for w, evs in events.items()}
            now = time.monotonic() - t0
            for w, evs in events.items():
                gone = [h for e in evs if type(e).__name__ == "BlockRemoved" for h in e.block_hashes]
                if gone:
                    removed[w].append((now, gone))
            results = apply_many[role](events)
            for w, res in results.items():
                if res.dropped or res.needs_resync:
                    index_log.append((now, w, f"events dropped {res.dropped}, resyncing: {res.reason}"))
            return results
        return wrapped

    def resyncing(role):
        def wrapped(worker, snapshot):
            index_log.append((time.monotonic() - t0, worker, f"resync {role}: {len(snapshot.blocks)} blocks at seq {snapshot.seq}"))
            return resync[role](worker, snapshot)
        return wrapped

    # the router's own notes on draining (a kv_events call that failed or timed out)
    index_log: list[tuple[float, str, str]] = []

    class Notes(logging.Handler):
        def emit(self, record):
            index_log.append((time.monotonic() - t0, "router", record.getMessage()))

    svc_log = logging.getLogger("router.service")
    svc_log.setLevel(logging.DEBUG)
    svc_log.addHandler(Notes(logging.DEBUG))
    resync = {role: idx.resync for role, idx in svc.indexes.items()}
    for role, idx in svc.indexes.items():
        idx.apply_many = counting(role)
        idx.resync = resyncing(role)
    seen: dict[int, dict[str, Any]] = {}
    choose = svc.policy.choose

    def recording(request, prefill, decode):
        placement = choose(request, prefill, decode)
        seen[id(placement)] = {
            "prefill_match": dict(request.prefill_match), "queued": {w.name: w.queued_tokens for w in prefill},
            "live": {w.name: w.live_prefixes for w in prefill}, "costs": dict(placement.costs),
            "index_modes": svc.indexes["prefill"].modes,
        }
        return placement

    svc.policy.choose = recording
    wl = replay(args)
    stats0 = {f"{s['role']}-{s['index']}": s for s in await svc.cluster.worker_stats()}
    records: list[dict[str, Any]] = []
    t0 = time.monotonic()

    async def one(s) -> None:
        await asyncio.sleep(s.start_s)
        spec = s.turns[0]
        prompt = spec.body["prompt"]
        result = RequestResult(len(prompt))
        sent = time.monotonic() - t0
        ttft = None
        params = SamplingParams(max_tokens=spec.body["max_tokens"], temperature=0.0, ignore_eos=True)
        async for ev in svc.run(prompt, [params], [], result):
            if ttft is None and ev.token_ids:
                ttft = time.monotonic() - t0 - sent
        pl = result.placement
        records.append({"trace_index": spec.meta["trace_index"], "sent_s": sent, "ttft_s": ttft, "prompt": len(prompt),
                        "prefill": pl.prefill, "decode": pl.decode, "cached": result.cached_tokens,
                        "hashes": [int(h) for h in svc.hasher.hash_blocks(prompt)], **seen.pop(id(pl), {})})

    await asyncio.gather(*(one(s) for s in wl.sessions))
    wall = time.monotonic() - t0
    await asyncio.sleep(1.5)
    stats1 = {f"{s['role']}-{s['index']}": s for s in await svc.cluster.worker_stats()}
    await svc.stop()
    per_worker = {w: {k: stats1[w][k] - stats0[w].get(k, 0) for k in
                      ("prefill_computed_tokens", "prefix_cache_hit_tokens", "prompt_tokens", "kv_recomputes",
                       "preemptions")} for w in stats1}
    for w in per_worker:
        per_worker[w]["blocks_removed"] = sum(len(h) for _, h in removed.get(w, []))
    records.sort(key=lambda r: r["sent_s"])
    hits, total = W.ideal_prefix_hits([s.turns[0].body["prompt"] for s in sorted(wl.sessions, key=lambda s: s.start_s)],
                                      svc.block_size)
    return {"args": vars(args), "wall_s": wall, "workers": per_worker, "records": records,
            "removed": {w: [(t, [int(h) for h in hs]) for t, hs in v] for w, v in removed.items()},
            "index_log": index_log,
            "ceiling_computed": total - hits, "block_size": svc.block_size,
            "cold_match_share": getattr(svc.policy, "cold_match_share", None)}


def classify(res: dict[str, Any], misses_only: bool = True) -> list[dict[str, Any]]:
    """One row per request whose realized hit is under what the one-unbounded-cache
    ceiling gives it (the longest leading run of blocks shared with any earlier request,
    the last token excluded), with its cause (module docstring). ``misses_only=False``:
    also the requests that got it all (their cause says what the policy saw; a request
    placed right by the live-conversation balance while its prefix was unknown counts)."""
    bs, recs = res["block_size"], res["records"]
    cold = res["cold_match_share"] or 0.0
    rows = []
    for j, r in enumerate(recs):
        usable = (r["prompt"] - 1) // bs
        best, parent = 0, None
        for k in recs[:j]:
            n = 0
            while n < min(len(r["hashes"]), len(k["hashes"])) and r["hashes"][n] == k["hashes"][n]:
                n += 1
            if n > best:
                best, parent = n, k
        ideal = min(best, usable) * bs
        got = r["cached"] or 0
        if parent is None or best < 2 or (misses_only and got >= ideal):
            continue
        holder = parent["prefill"]
        held = r["prefill_match"].get(holder, 0) * bs
        predicted = min(r["prefill_match"].get(r["prefill"], 0) * bs, r["prompt"])
        if parent["sent_s"] + (parent["ttft_s"] or 0) > r["sent_s"]:
            cause = "pending"
        elif ideal < cold * r["prompt"]:
            cause = "cold share"
        elif held < ideal:
            shared = set(r["hashes"][: ideal // bs])
            gone = any(t < r["sent_s"] and shared & set(hs) for t, hs in res["removed"].get(holder, []))
            cause = "evicted before the decision" if gone else "held but not in the index"
        elif r["prefill"] != holder:
            cause = "placed away"
        elif got < ideal:
            cause = "evicted after the decision"
        else:
            cause = "hit"
        rows.append({"request": f"trace{r['trace_index']}", "sent_s": round(r["sent_s"], 2), "ideal": ideal, "got": got,
                     "lost": ideal - got, "parent": f"trace{parent['trace_index']}", "parent_on": holder,
                     "placed_on": r["prefill"], "holder_matched": held, "predicted": predicted,
                     "queued": r.get("queued"), "costs": {w: round(c) for w, c in r.get("costs", {}).items()},
                     "cause": cause})
    return rows


def summarize(res: dict[str, Any]) -> str:
    recs = res["records"]
    computed = sum(s["prefill_computed_tokens"] for s in res["workers"].values())
    L = [f"policy {res['args']['policy']}: {len(recs)} requests in {res['wall_s']:.0f}s; prefill computed {computed} "
         f"(ceiling {res['ceiling_computed']}: {computed / res['ceiling_computed']:.2f}x)"]
    for w, s in sorted(res["workers"].items()):
        L.append(f"  {w}: computed {s['prefill_computed_tokens']}, hit {s['prefix_cache_hit_tokens']}, "
                 f"blocks evicted {s['blocks_removed']}, recomputes {s['kv_recomputes']}, preemptions {s['preemptions']}, "
                 f"decisions {sum(1 for r in recs if w in (r['prefill'], r['decode']))}")
    bs = res["block_size"]
    predicted = sum(min(r["prefill_match"].get(r["prefill"], 0) * bs, r["prompt"]) for r in recs if r["prefill"])
    L.append(f"  predicted hits {predicted}, realized {sum(r['cached'] or 0 for r in recs)}")
    by_cause: dict[str, int] = defaultdict(int)
    for row in classify(res):
        by_cause[row["cause"]] += row["lost"]
        L.append("  " + json.dumps(row))
    L.append("  lost tokens by cause: " + json.dumps(dict(by_cause)))
    seen_as: dict[str, list[str]] = defaultdict(list)
    for row in classify(res, misses_only=False):
        seen_as[row["cause"]].append(row["request"])
    L.append("  follow-ups (>= 2 shared blocks) by what the policy saw: " + json.dumps(dict(seen_as)))
    for t, w, note in res.get("index_log", []):
        L.append(f"  index {t:6.2f}s {w}: {note}")
    return "\n".join(L)


def main(argv=None) -> int:
    print(summarize(run_on_local_ray(run, parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
