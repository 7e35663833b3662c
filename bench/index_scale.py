"""The residency index at cluster scale, no model: memory per (worker, block) entry,
event-apply rate and placement decision latency at N workers and 1M+ entries.

Each worker receives a stream of requests: a system prompt shared by the whole pool
(one of ``system_prompts``), then a conversation of its own that later requests extend.
A worker stores the blocks its request added (``BlockStored`` with the true parent) and,
over its capacity, evicts its least recently used blocks (``BlockRemoved``). The events
of one poll interval (``events_per_poll`` requests per worker) are applied per worker in
one ``apply`` call, as the router's event loop does. Events are generated before the
clock starts; only ``apply`` and ``match`` + ``policy.choose`` are timed.

    python -m bench.index_scale --workers 128 --blocks-per-worker 8192
    python -m bench.index_scale --index reference   # the object-tree index kept for tests
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import random
import time
import tracemalloc
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from cluster.kv_events import BlockRemoved, BlockStored, KVEvent
from router.placement import PlacementRequest, WorkerSnapshot, make_policy

INDEXES = {"compact": "router.residency_index", "reference": "tests.reference_residency_index"}


@dataclass(frozen=True)
class IndexScale:
    index: str
    workers: int
    entries: int  # (worker, block) entries after the fill
    nodes: int
    bytes_per_entry: float  # tracemalloc: everything the index allocated / entries
    fill_blocks_per_s: float  # stored blocks applied per CPU second (thread time) while filling
    steady_blocks_per_s: float  # stored + removed blocks per CPU second at capacity
    decision_p50_ms: float  # CPU time of match (prefill + decode index) + kv_aware choose, one prompt
    decision_p99_ms: float
    prompt_blocks: int


class _WorkerStream:
    """One simulated worker's cache and the events it emits."""

    def __init__(self, rng: random.Random, capacity: int, system: list[list[int]]) -> None:
        self.rng, self.capacity, self.system = rng, capacity, system
        self.cache: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self.convs: list[list[int]] = []
        self.seq = 0

    def request(self) -> tuple[list[int], list[KVEvent]]:
        """One request's chain and the events it caused."""
        rng = self.rng
        if self.convs and rng.random() < 0.6:
            chain = rng.choice(self.convs)
        else:
            chain = list(rng.choice(self.system))
            self.convs.append(chain)
            if len(self.convs) > 64:
                self.convs.pop(0)
        chain.extend(rng.getrandbits(64) for _ in range(rng.randrange(4, 17)))
        events: list[KVEvent] = []
        first_new = next((i for i, h in enumerate(chain) if h not in self.cache), len(chain))
        for h in chain[:first_new]:
            self.cache.move_to_end(h)
        new = chain[first_new:]
        if new:
            self.seq += 1
            events.append(BlockStored(self.seq, tuple(new), chain[first_new - 1] if first_new else None))
            for h in new:
                self.cache[h] = None
        over = len(self.cache) - self.capacity
        if over > 0:
            gone = [self.cache.popitem(last=False)[0] for _ in range(over)]
            self.seq += 1
            events.append(BlockRemoved(self.seq, tuple(gone)))
        return chain, events


def _polls(streams, rounds: int, per_poll: int) -> tuple[list[list[tuple[str, list[KVEvent]]]], list[list[int]]]:
    polls, chains = [], []
    for _ in range(rounds):
        poll = []
        for name, s in streams.items():
            evs: list[KVEvent] = []
            for _ in range(per_poll):
                chain, e = s.request()
                evs += e
                chains.append(chain)
            poll.append((name, evs))
        polls.append(poll)
    return polls, chains


def _blocks(poll) -> int:
    return sum(len(e.block_hashes) for _, evs in poll for e in evs)


def measure(index: str = "compact", workers: int = 128, blocks_per_worker: int = 8192, system_prompts: int = 32,
            system_blocks: int = 32, events_per_poll: int = 4, steady_rounds: int = 20, decisions: int = 300,
            prompt_blocks: int = 128, seed: int = 0) -> IndexScale:
    mod = importlib.import_module(INDEXES[index])
    rng = random.Random(seed)
    system = [[rng.getrandbits(64) for _ in range(system_blocks)] for _ in range(system_prompts)]
    names = [f"prefill-{i}" for i in range(workers)]
    streams = {n: _WorkerStream(random.Random(rng.getrandbits(32)), blocks_per_worker, system) for n in names}
    # fill: until every worker is at capacity
    fill_rounds = 0
    fill: list = []
    while min(len(s.cache) for s in streams.values()) < blocks_per_worker:
        p, _ = _polls(streams, 1, events_per_poll)
        fill += p
        fill_rounds += 1
    steady, chains = _polls(streams, steady_rounds, events_per_poll)

    cap = workers * blocks_per_worker * 2
    # memory: one fill under tracemalloc (numpy reports its buffers to it too)
    idx = mod.ResidencyIndex(max_blocks=cap)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for poll in fill:
        _apply(idx, poll)
    mem = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del idx
    gc.collect()
    # speed: the same fill and then the steady state, without tracemalloc
    # CPU time of this thread: the machine these ran on is shared, and wall time would
    # charge other processes' slices to the index
    idx = mod.ResidencyIndex(max_blocks=cap)
    t = time.thread_time()
    for poll in fill:
        _apply(idx, poll)
    fill_s = time.thread_time() - t
    entries, nodes = idx.num_blocks, idx.num_nodes
    t = time.thread_time()
    for poll in steady:
        _apply(idx, poll)
    steady_s = time.thread_time() - t

    # decisions: a prompt extending a known conversation, looked up in the prefill and
    # decode indexes (the same index stands in for both) and placed by kv_aware
    policy = make_policy("kv_aware")
    snaps = [WorkerSnapshot(n, rng.randrange(4), rng.randrange(4), 1000, 2000) for n in names]
    lat = []
    for _ in range(decisions):
        chain = rng.choice(chains)
        prompt = (chain + [rng.getrandbits(64) for _ in range(prompt_blocks)])[:prompt_blocks]
        t = time.thread_time()
        compact = hasattr(idx, "touch")  # the reference touches every match instead of the chosen worker
        pm = idx.match(prompt, touch=not compact).blocks
        dm = idx.match(prompt, touch=False).blocks
        p = policy.choose(PlacementRequest(prompt_blocks * 16, 16, pm, dm, 2.0 * 2**20), snaps, snaps)
        if compact:
            idx.touch(p.prefill, prompt, pm.get(p.prefill, 0))
        lat.append(time.thread_time() - t)
    lat_ms = np.array(lat) * 1e3
    return IndexScale(index, workers, entries, nodes, mem / max(entries, 1), _sum_blocks(fill) / fill_s,
                      _sum_blocks(steady) / steady_s, float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99)),
                      prompt_blocks)


def _apply(idx, poll) -> None:
    """One poll interval's events: in one pass where the index can, else per worker."""
    if hasattr(idx, "apply_many"):
        idx.apply_many(dict(poll))
    else:
        for name, evs in poll:
            idx.apply(name, evs)


def _sum_blocks(polls) -> int:
    return sum(_blocks(p) for p in polls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", choices=sorted(INDEXES), default="compact")
    ap.add_argument("--workers", type=int, default=128)
    ap.add_argument("--blocks-per-worker", type=int, default=8192)
    ap.add_argument("--events-per-poll", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    r = measure(a.index, a.workers, a.blocks_per_worker, events_per_poll=a.events_per_poll, seed=a.seed)
    print(json.dumps(asdict(r), indent=1))


if __name__ == "__main__":
    main()
