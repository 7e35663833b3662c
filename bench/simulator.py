"""Placement at a scale this machine cannot run: a discrete-event simulation of N prefill
and N/2 decode workers with no model, driving the router's real parts.

What is real: ``ResidencyIndex`` (one per pool and per router replica, fed by the
workers' KV events every ``poll_s`` of simulated time through ``apply_many``), the
placement policies (``make_policy``: the same objects the router builds, timed per
decision), ``PendingPrefixes``, and the router's bookkeeping of queued tokens. What is
simulated: each worker's prefix cache (an LRU of block hashes at a fixed capacity that
emits ``BlockStored`` / ``BlockRemoved`` like the block manager, chain tails evicted
first), and time, from ``TimingModel``::

    arrival ─► router (match both indexes + pending, policy.choose) ─► P's FCFS queue
      P: prefill(new tokens, context) ─► first token (TTFT) ─► stores its blocks
      D: dedups the prompt against its cache, receives the rest (bytes counted),
         decodes output_len x tpot, keeps the prompt's blocks (LRU) afterwards

Workloads: the Mooncake conversation trace (512-token hash ids, arrivals compressed so
the pool runs at ``load`` of its no-cache prefill capacity) and synthetic multi-turn
chat (shared system prompts; each turn resends the history and arrives a think time
after the previous answer). The ceiling is one unbounded cache that sees every request
in arrival order: no placement can hit more.

    python -m bench.simulator                      # 8, 32, 128 workers; writes bench/results/simulator.*
    python -m bench.simulator --workers 8 --limit 2000 --out /tmp/sim
"""

from __future__ import annotations

import argparse
import heapq
from itertools import islice
import json
import random
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from cluster.kv_events import BlockRemoved, BlockStored, KVEvent
from router.pending_prefixes import PendingPrefixes
from router.placement import PlacementRequest, WorkerSnapshot, make_policy
from router.residency_index import ResidencyIndex

TRACE = Path("/work/shared/traces/mooncake_conversation.jsonl")
POLICIES = ("round_robin", "least_loaded", "kv_aware")


@dataclass(frozen=True)
class TimingModel:
    """Published GPU numbers, not this machine's (a 2-core CPU says nothing about an
    H100): Llama-3.1-8B in bf16 on one H100 80 GB.

    prefill(n new tokens after c cached) = overhead + n / prefill_tok_s
                                           + attn_s * n * (c + n / 2)
    prefill_tok_s: ~16k tokens/s of dense prefill (vLLM / SGLang report 10-20k for 8B
      on an H100 at 1-4k-token prompts); attn_s: the attention term, from the FLOPs
      ratio of attention (4 x 32 layers x 4096 per context token) to the dense part
      (2 x 8e9 per token): 3.3e-5 of one dense token per context token.
    tpot_s: 20 ms per output token at moderate batch sizes.
    kv_bytes_per_token: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes = 128 KiB.
    capacity_tokens: KV that stays as prefix cache per worker: ~50 GB of an 80 GB GPU
      after weights and activations = 400k tokens."""

    overhead_s: float = 0.004
    prefill_tok_s: float = 16_000.0
    attn_s: float = 3.3e-5 / 16_000.0
    tpot_s: float = 0.020
    kv_bytes_per_token: int = 131_072
    capacity_tokens: int = 400_000

    def prefill_s(self, new: int, cached: int) -> float:
        return self.overhead_s + new / self.prefill_tok_s + self.attn_s * new * (cached + new / 2)


@dataclass
class SimRequest:
    rid: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    hashes: list[int]  # chained hashes of the prompt's full blocks
    conv: int = -1  # synthetic: conversation, to schedule its next turn
    turn: int = 0
    # filled by the run
    replica: int = 0
    prefill: str = ""
    decode: str = ""
    predicted_hit: int = 0
    hit: int = 0
    first_token: float = 0.0
    pending: int = -1


class _Cache:
    """A worker's prefix cache: LRU over block hashes, chain tails evicted first,
    numbered events like the block manager's."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.pinned: dict[int, int] = {}  # decode side: blocks of running requests
        self.events: list[KVEvent] = []
        self.seq = 0
        self.evicted = 0

    def leading(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.lru:
                break
            n += 1
        return n

    def store(self, hashes: list[int]) -> None:
        """The chain is resident: new blocks reported stored; the whole chain touched
        tail first (its head most recent); then LRU evictions over capacity."""
        first_new = self.leading(hashes)
        new = hashes[first_new:]
        if new:
            self.seq += 1
            self.events.append(BlockStored(self.seq, tuple(new), hashes[first_new - 1] if first_new else None))
        for h in reversed(hashes):
            self.lru[h] = None
            self.lru.move_to_end(h)
        over = len(self.lru) - self.capacity
        if over > 0:
            gone = list(islice((h for h in self.lru if h not in self.pinned), over))
            for h in gone:
                del self.lru[h]
            self.evicted += len(gone)
            if gone:
                self.seq += 1
                self.events.append(BlockRemoved(self.seq, tuple(gone)))

    def pin(self, hashes: list[int], delta: int) -> None:
        for h in hashes:
            c = self.pinned.get(h, 0) + delta
            if c > 0:
                self.pinned[h] = c
            else:
                self.pinned.pop(h, None)

    def take_events(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out


@dataclass
class _Prefill:
    name: str
    cache: _Cache
    queue: list[SimRequest] = field(default_factory=list)
    busy_until: float = 0.0
    busy: bool = False
    busy_s: float = 0.0
    computed: int = 0


@dataclass
class _Decode:
    name: str
    cache: _Cache
    running: int = 0


@dataclass
class _Replica:
    """One router replica: its own policy, pending prefixes and queued-token counts;
    its own indexes, fed by every worker's events like the others'."""

    policy: object
    pindex: ResidencyIndex
    dindex: ResidencyIndex
    pending: PendingPrefixes = field(default_factory=PendingPrefixes)
    queued: dict[str, int] = field(default_factory=dict)
    placed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SimResult:
    workload: str
    policy: str
    workers: int
    replicas: int
    requests: int
    prompt_tokens: int
    computed_tokens: int
    hit_tokens: int
    ceiling_hit_tokens: int
    hit_share_of_ceiling: float
    predicted_equals_realized: float  # share of requests whose predicted hit was realized
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    imbalance: float  # max / mean prefill busy time over the prefill workers
    shipped_gib: float
    decision_p50_ms: float  # CPU time of match (both pools + pending) + policy.choose
    decision_p99_ms: float
    sim_wall_s: float


# ---- workloads ------------------------------------------------------------------------


def _h(*parts: int) -> int:
    return xxhash.xxh3_64_intdigest(np.array(parts, dtype=np.int64).tobytes())


def mooncake(n_workers: int, timing: TimingModel, load: float, limit: int | None = None) -> tuple[list[SimRequest], int]:
    """The trace, arrivals compressed so that its prompt tokens are ``load`` of the
    pool's no-cache prefill capacity. Returns (requests, block tokens)."""
    rows = [json.loads(line) for line in TRACE.open()][:limit]
    span = max(rows[-1]["timestamp"] / 1000.0, 1.0)
    offered = sum(r["input_length"] for r in rows) / span  # tokens/s
    speed = load * n_workers * timing.prefill_tok_s / offered
    reqs = []
    for i, r in enumerate(rows):
        full = r["input_length"] // 512
        reqs.append(SimRequest(i, r["timestamp"] / 1000.0 / speed, r["input_length"], max(1, r["output_length"]),
                               [_h(7, x) for x in r["hash_ids"][:full]]))
    return reqs, 512


@dataclass(frozen=True)
class Chat:
    """Synthetic multi-turn chat: conversations arrive Poisson; each has one of
    ``system_prompts`` shared system prompts and 2..``max_turns`` turns; a turn's prompt
    is the system prompt and the whole history; the next turn arrives a think time
    (exponential) after the previous answer's last token."""

    conversations_per_worker: int = 12
    system_prompts: int = 16
    system_tokens: tuple[int, int] = (512, 4096)
    user_tokens: tuple[int, int] = (50, 400)
    answer_tokens: tuple[int, int] = (50, 500)
    max_turns: int = 10
    think_s: float = 10.0
    block_tokens: int = 64


class _ChatGen:
    def __init__(self, chat: Chat, n_workers: int, timing: TimingModel, load: float, seed: int) -> None:
        self.chat, self.rng = chat, random.Random(seed)
        rng = self.rng
        self.sys_len = [rng.randint(*chat.system_tokens) for _ in range(chat.system_prompts)]
        n = chat.conversations_per_worker * n_workers
        self.convs = []
        for c in range(n):
            turns = rng.randint(2, chat.max_turns)
            msgs = [(rng.randint(*chat.user_tokens), rng.randint(*chat.answer_tokens)) for _ in range(turns)]
            self.convs.append((rng.randrange(chat.system_prompts), msgs))
        # mean prompt tokens per conversation, to set the conversation arrival rate
        work = np.mean([sum(self.sys_len[s] + sum(u + a for u, a in m[:t]) + m[t][0] for t in range(len(m)))
                        for s, m in self.convs])
        rate = load * n_workers * timing.prefill_tok_s / work  # conversations/s
        t, self.starts = 0.0, []
        for _ in range(n):
            t += rng.expovariate(rate)
            self.starts.append(t)
        self.rid = 0

    def first_turns(self) -> list[SimRequest]:
        return [self.turn(c, 0, self.starts[c]) for c in range(len(self.convs))]

    def turn(self, c: int, t: int, at: float) -> SimRequest | None:
        s, msgs = self.convs[c]
        if t >= len(msgs):
            return None
        B = self.chat.block_tokens
        prompt = self.sys_len[s] + sum(u + a for u, a in msgs[:t]) + msgs[t][0]
        shared = self.sys_len[s] // B  # blocks wholly inside the shared system prompt
        hashes = [_h(1, s, i) if i < shared else _h(2, c, i) for i in range(prompt // B)]
        self.rid += 1
        return SimRequest(self.rid, at, prompt, msgs[t][1], hashes, conv=c, turn=t)


# ---- the simulation -------------------------------------------------------------------


class Simulation:
    def __init__(self, policy: str, n_workers: int, timing: TimingModel, block_tokens: int, replicas: int = 1,
                 poll_s: float = 0.05, decode_ratio: float = 0.5, seed: int = 0, policy_options: dict | None = None) -> None:
        self.timing, self.bt, self.poll_s = timing, block_tokens, poll_s
        cap = max(1, timing.capacity_tokens // block_tokens)
        self.prefill = {f"prefill-{i}": _Prefill(f"prefill-{i}", _Cache(cap)) for i in range(n_workers)}
        n_dec = max(1, int(n_workers * decode_ratio))
        self.decode = {f"decode-{i}": _Decode(f"decode-{i}", _Cache(cap)) for i in range(n_dec)}
        # The simulated decode workers compute nothing but decode steps: kv_aware's local
        # prefill (a decode worker prefilling a short rest itself) is not modelled.
        opts = {"local_prefill_max_tokens": 0, **(policy_options or {})}
        self.replicas = [_Replica(make_policy(policy, **(opts if policy == "kv_aware" else {})),
                                  ResidencyIndex(max_blocks=10**8), ResidencyIndex(max_blocks=10**8))
                         for _ in range(replicas)]
        self.block_bytes = block_tokens * timing.kv_bytes_per_token
        self.rng = random.Random(seed)
        self._heap: list = []
        self._n = 0
        self.done: list[SimRequest] = []
        self.decision_s: list[float] = []
        self.shipped = 0

    def _at(self, t: float, kind: str, *payload) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, kind, payload))

    def run(self, arrivals: list[SimRequest], next_turn=None) -> None:
        for r in arrivals:
            self._at(r.arrival, "arrive", r)
        self._at(0.0, "poll")
        live = len(arrivals)
        while self._heap and live:
            now, _, kind, payload = heapq.heappop(self._heap)
            if kind == "poll":
                self._poll()
                self._at(now + self.poll_s, "poll")
            elif kind == "arrive":
                self._place(payload[0], now)
            elif kind == "prefilled":
                self._prefilled(payload[0], now)
            elif kind == "finished":
                r = payload[0]
                d = self.decode[r.decode]
                d.running -= 1
                d.cache.pin(r.hashes, -1)
                live -= 1
                nxt = next_turn(r, now) if next_turn else None
                if nxt is not None:
                    live += 1
                    self._at(nxt.arrival, "arrive", nxt)

    def _poll(self) -> None:
        pe = {n: w.cache.take_events() for n, w in self.prefill.items()}
        de = {n: w.cache.take_events() for n, w in self.decode.items()}
        for rep in self.replicas:
            rep.pindex.apply_many(pe)
            rep.dindex.apply_many(de)

    def _snapshots(self, rep: _Replica) -> tuple[list[WorkerSnapshot], list[WorkerSnapshot]]:
        ps = [WorkerSnapshot(w.name, int(w.busy), len(w.queue), w.cache.capacity, w.cache.capacity,
                             queued_tokens=rep.queued.get(w.name, 0)) for w in self.prefill.values()]
        ds = [WorkerSnapshot(d.name, d.running, 0, max(0, d.cache.capacity - len(d.cache.pinned)), d.cache.capacity)
              for d in self.decode.values()]
        return ps, ds

    def _place(self, r: SimRequest, now: float) -> None:
        rep = self.replicas[r.rid % len(self.replicas)]
        r.replica = r.rid % len(self.replicas)
        ps, ds = self._snapshots(rep)
        t0 = time.thread_time()
        pm = rep.pindex.match(r.hashes, touch=False).blocks
        pend = rep.pending.match(r.hashes)
        pm = {w: max(pm.get(w, 0), pend.get(w, 0)) for w in pm.keys() | pend.keys()}
        dm = rep.dindex.match(r.hashes, touch=False).blocks
        placement = rep.policy.choose(PlacementRequest(r.prompt_tokens, self.bt, pm, dm, self.block_bytes), ps, ds)
        self.decision_s.append(time.thread_time() - t0)
        r.prefill, r.decode = placement.prefill, placement.decode
        r.predicted_hit = min(pm.get(r.prefill, 0) * self.bt, r.prompt_tokens)
        r.pending = rep.pending.add(r.prefill, r.hashes)
        rep.queued[r.prefill] = rep.queued.get(r.prefill, 0) + r.prompt_tokens - r.predicted_hit
        w = self.prefill[r.prefill]
        w.queue.append(r)
        if not w.busy:
            self._start(w, now)

    def _start(self, w: _Prefill, now: float) -> None:
        r = w.queue.pop(0)
        r.hit = min(w.cache.leading(r.hashes) * self.bt, r.prompt_tokens)
        new = r.prompt_tokens - r.hit
        dt = self.timing.prefill_s(new, r.hit)
        w.busy, w.busy_s, w.computed = True, w.busy_s + dt, w.computed + new
        self._at(now + dt, "prefilled", r)

    def _prefilled(self, r: SimRequest, now: float) -> None:
        w = self.prefill[r.prefill]
        w.cache.store(r.hashes)
        rep = self.replicas[r.replica]
        rep.pending.remove(r.pending)
        rep.queued[r.prefill] -= r.prompt_tokens - r.predicted_hit
        r.first_token = now
        d = self.decode[r.decode]
        self.shipped += (len(r.hashes) - d.cache.leading(r.hashes)) * self.block_bytes
        d.cache.store(r.hashes)
        d.cache.pin(r.hashes, +1)
        d.running += 1
        self.done.append(r)
        self._at(now + r.output_tokens * self.timing.tpot_s, "finished", r)
        w.busy = False
        if w.queue:
            self._start(w, now)


def ceiling_hits(reqs: list[SimRequest], block_tokens: int) -> int:
    """One unbounded cache seeing every request at its arrival, in order."""
    seen: set[int] = set()
    hits = 0
    for r in sorted(reqs, key=lambda r: (r.arrival, r.rid)):
        n = 0
        for h in r.hashes:
            if h not in seen:
                break
            n += 1
        hits += min(n * block_tokens, r.prompt_tokens)
        seen.update(r.hashes)
    return hits


def simulate(workload: str, policy: str, n_workers: int, timing: TimingModel = TimingModel(), load: float = 0.7,
             replicas: int = 1, limit: int | None = None, chat: Chat = Chat(), seed: int = 0,
             policy_options: dict | None = None) -> SimResult:
    t0 = time.perf_counter()
    if workload == "mooncake":
        reqs, bt = mooncake(n_workers, timing, load, limit)
        sim = Simulation(policy, n_workers, timing, bt, replicas, seed=seed, policy_options=policy_options)
        sim.run(reqs)
    elif workload == "chat":
        gen = _ChatGen(chat, n_workers, timing, load, seed)
        bt = chat.block_tokens
        sim = Simulation(policy, n_workers, timing, bt, replicas, seed=seed, policy_options=policy_options)
        sim.run(gen.first_turns(), lambda r, now: gen.turn(r.conv, r.turn + 1, now + gen.rng.expovariate(1 / chat.think_s)))
    else:
        raise ValueError(f"unknown workload {workload!r}: mooncake or chat")
    done = sim.done
    ttft = np.array([r.first_token - r.arrival for r in done])
    busy = np.array([w.busy_s for w in sim.prefill.values()])
    hits = sum(r.hit for r in done)
    ceiling = ceiling_hits(done, bt)
    dec = np.array(sim.decision_s) * 1e3
    return SimResult(
        workload, policy, n_workers, replicas, len(done), sum(r.prompt_tokens for r in done),
        sum(w.computed for w in sim.prefill.values()), hits, ceiling, hits / max(ceiling, 1),
        float(np.mean([r.hit == r.predicted_hit for r in done])),
        float(np.percentile(ttft, 50)), float(np.percentile(ttft, 90)), float(np.percentile(ttft, 99)),
        float(busy.max() / max(busy.mean(), 1e-9)), sim.shipped / 2**30,
        float(np.percentile(dec, 50)), float(np.percentile(dec, 99)), time.perf_counter() - t0,
    )


# ---- report -----------------------------------------------------------------------------

COLUMNS = [
    ("workload", "{}"), ("workers", "{}"), ("replicas", "{}"), ("policy", "{}"), ("requests", "{}"),
    ("computed_tokens", "{:,}"), ("hit_tokens", "{:,}"), ("hit_share_of_ceiling", "{:.0%}"),
    ("predicted_equals_realized", "{:.1%}"), ("ttft_p50_s", "{:.2f}"), ("ttft_p90_s", "{:.2f}"), ("ttft_p99_s", "{:.2f}"),
    ("imbalance", "{:.2f}"), ("shipped_gib", "{:,.0f}"), ("decision_p50_ms", "{:.3f}"), ("decision_p99_ms", "{:.3f}"),
]


def table(results: list[SimResult]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(f.format(getattr(r, c)) for c, f in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def plot(results: list[SimResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for row, workload in enumerate(("mooncake", "chat")):
        rs = [r for r in results if r.workload == workload and r.replicas == 1]
        sizes = sorted({r.workers for r in rs})
        x = np.arange(len(sizes))
        for i, pol in enumerate(POLICIES):
            share = [next((r.hit_share_of_ceiling for r in rs if r.workers == n and r.policy == pol), 0) for n in sizes]
            p90 = [next((r.ttft_p90_s for r in rs if r.workers == n and r.policy == pol), 0) for n in sizes]
            axes[row][0].bar(x + (i - 1) * 0.27, share, 0.27, label=pol)
            axes[row][1].bar(x + (i - 1) * 0.27, p90, 0.27, label=pol)
        for ax, title in zip(axes[row], ("hit tokens / one-cache ceiling", "TTFT p90 (s, timing model)")):
            ax.set_xticks(x, [f"{n} workers" for n in sizes])
            ax.set_title(f"{workload}: {title}")
            ax.legend()
        axes[row][1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str], out: str) -> None:
    """One report from several runs (e.g. one process per workload)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in runs[0].items() if k != "results"}
    merged["runs"] = [{k: v for k, v in r.items() if k not in ("results", "index_scale")} | {"file": p}
                      for p, r in zip(paths, runs)]
    merged["results"] = [x for r in runs for x in r["results"]]
    merged["index_scale"] = [x for r in runs for x in r.get("index_scale", [])]
    results = [SimResult(**x) for x in merged["results"]]
    Path(out + ".json").write_text(json.dumps(merged, indent=1))
    Path(out + ".table.md").write_text(table(results) + "\n")
    plot(results, Path(out + ".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--workloads", nargs="+", default=["mooncake", "chat"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--load", type=float, default=0.5, help="offered prompt tokens / the pool's no-cache prefill capacity")
    ap.add_argument("--limit", type=int, default=None, help="first N trace requests")
    ap.add_argument("--replicas-at", type=int, default=32, help="also run kv_aware with 2 replicas at this size")
    ap.add_argument("--index-scale", action="store_true", help="also measure the index at 128 workers x 8192 blocks")
    ap.add_argument("--kv-aware", nargs="*", default=[], metavar="WEIGHT=VALUE",
                    help="kv_aware weights (router.kv_aware), e.g. queue_weight=0.5")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only combine earlier runs' json files into --out")
    ap.add_argument("--out", default="bench/results/simulator")
    a = ap.parse_args()
    opts = {k: float(v) for k, v in (kv.split("=", 1) for kv in a.kv_aware)}
    if a.merge:
        merge(a.merge, a.out)
        return
    results = []
    out = {"timing": asdict(TimingModel()), "chat": asdict(Chat()), "load": a.load, "limit": a.limit, "kv_aware": opts,
           "results": []}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for wl in a.workloads:
        for n in a.workers:
            runs = [(pol, 1) for pol in a.policies]
            if n == a.replicas_at and "kv_aware" in a.policies:
                runs.append(("kv_aware", 2))
            for pol, replicas in runs:
                results.append(simulate(wl, pol, n, load=a.load, limit=a.limit, replicas=replicas, policy_options=opts))
                print(table(results[-1:]).splitlines()[-1], flush=True)
                out["results"] = [asdict(r) for r in results]
                Path(a.out + ".json").write_text(json.dumps(out, indent=1))  # after every run: partial results survive
    if a.index_scale:
        from bench.index_scale import measure

        out["index_scale"] = [asdict(measure("compact", 128, 8192))]
        print(out["index_scale"], flush=True)
    Path(a.out + ".json").write_text(json.dumps(out, indent=1))
    Path(a.out + ".table.md").write_text(table(results) + "\n")
    plot(results, Path(a.out + ".png"))


if __name__ == "__main__":
    main()
