"""Placement policies: pick a prefill worker P and a decode worker D for one request.

A policy is a small object over snapshots (load, free KV, prefix match per worker); it
does no I/O and keeps at most a little state (round-robin positions). Policies are
chosen by name, so benchmarks compare them side by side::

    policy = make_policy("kv_aware")
    placement = policy.choose(request, prefill_workers, decode_workers)
    placement.prefill, placement.decode, placement.costs

Colocated mode is an empty prefill list: ``prefill`` is None and the decode list is
the colocated pool, whose match (``decode_match``) saves recomputation there instead
of transfer.

``kv_aware``'s cost is one named formula over a (P, D) pair, in tokens of prefill work
(lower is better); its weights come from the config (``router.kv_aware``)::

    cost(P, D) = prefill(P) + decode(D)

    prefill(P) = uncached_tokens(P) + queue_weight * queued_tokens(P)
    decode(D)  = running_weight * (running + waiting)(D)
               + kv_usage_weight * kv_usage_after(D)
               + transfer_weight * ship_mib(D)

    uncached_tokens(P) = prompt_tokens - held(P)                          (to compute on P)
    held(P)            = prefill_match[P] * block_size, or 0 when that is under
                         cold_match_share of the prompt (a shared header, not a conversation)

    A cold prompt (held(P) = 0 on every prefill worker) also pays
    live_prefix_weight * live_prefixes(P): the conversations (prompt chains) P serves
    now (router/live_prefixes.py), so new conversations spread evenly over the caches.
    queued_tokens(P)   = uncached prompt tokens the router already placed on P and
                         whose first token has not come back (work ahead of this one)
    kv_usage_after(D)  = 1 - (free_blocks - missing_blocks(D)) / total_blocks   (0..1)
    ship_mib(D)        = missing_blocks(D) * block_bytes / 2**20   (what P sends D: the
                         blocks D lacks, in compressed bytes when compression is on)

Shipping depends on D alone (the layer-wise stream overlaps P's compute; the exposed
part is at most the whole payload, which the linear term charges), so the pair that
minimises ``cost(P, D)`` is the cheapest P with the cheapest D: O(P + D), not O(P x D).
A decode worker that holds a conversation's prefix needs only the rest shipped, so a
conversation's later turns land where both its prefill cache and its decode pages are.

Colocated mode scores one pool with ``prefill(W) + decode(W)`` minus the transfer term
(nothing is shipped).

**Local prefill** (conditional disaggregation, as Dynamo and vLLM do it; off unless
``local_prefill_max_tokens`` > 0, see the weights below): a decode
worker D that holds more of the prompt than any prefill worker, with at most
``local_prefill_max_tokens`` of it left to compute, may prefill the rest itself::

    local(D) = uncached_tokens(D) + queue_weight * queued_tokens(D) + decode(D) - transfer term

and does so when ``local(D)`` is below the best pair's ``cost(P, D)``; the placement's
``prefill`` is then None, as in colocated mode. Multi-turn chat is the case: the decode
worker generated the last answer, so it holds the conversation up to the end of that
answer, while the prefill worker that computed the last prompt holds it only up to the
answer's start (the measured reason kv_aware could not win by much on chat before). Decode candidates without room for the blocks they lack
(``free_blocks < missing_blocks``) are skipped; if nobody has room, the one with the
most free blocks is taken (its reserve may still fail and retry). Exact ties rotate
to the worker whose cache holds the fewest blocks (SGLang's "smallest tree"), then
rotate over the tied workers, so new prefixes spread over the pool.

Why the cold share: every chat conversation starts with the same system-prompt header
(one block here). Counted as a prefix, it sent each new conversation to the worker that
served the first one (measured: 5 of 6 conversations on one of two prefill workers,
bench/chat_diagnosis.py); when the KV holds about half the conversations, that worker
then evicts its own conversations while the other one idles. Without the header, a new
conversation went by load alone, and 4 of 6 could still land on one worker (measured
with caches full of earlier conversations, where the fewest-cached-blocks tie-break
sees no difference); hence the live-prefix term for cold prompts. It counts
conversations, not tokens: a first measure, the prompt tokens placed on a worker
lately (decayed, 30 s half-life), still held the ended conversations of a previous run
~1,500 tokens apart between the two workers, more than a new conversation's first
turn weighs, and sent 4 of the next 6 new conversations to one worker.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_POLICY = "kv_aware"


class NoWorkerError(ValueError):
    """No worker of a pool is up to take the request."""


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker as placement sees it (from its last health probe)."""

    name: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    up: bool = True
    cached_blocks: int = 0  # blocks the router's index says this worker holds
    # Uncached prompt tokens the router placed here whose first token has not come back
    # (prefill side; the router knows them because it placed them).
    queued_tokens: int = 0
    # Conversations (prompt chains) this worker computes for now: a request in flight,
    # or one finished within the router's live window (router/live_prefixes.py); new
    # (cold) prompts are balanced on it.
    live_prefixes: int = 0

    def __post_init__(self) -> None:
        if min(self.running, self.waiting, self.free_blocks, self.queued_tokens, self.live_prefixes) < 0 or self.total_blocks <= 0:
            raise ValueError(f"bad worker snapshot {self}")

    @property
    def load(self) -> int:
        return self.running + self.waiting


@dataclass(frozen=True)
class PlacementRequest:
    """A request as placement sees it: its size and the residency index's matches
    (leading blocks held, per worker name; absent means 0)."""

    num_prompt_tokens: int
    block_size: int
    prefill_match: Mapping[str, int] = field(default_factory=dict)
    decode_match: Mapping[str, int] = field(default_factory=dict)
    block_bytes: float = 0.0  # bytes P ships D per block D lacks (compressed, if compression is on)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0 or self.block_size <= 0 or self.block_bytes < 0:
            raise ValueError(
                f"num_prompt_tokens ({self.num_prompt_tokens}) must be >= 0, block_size ({self.block_size}) > 0 "
                f"and block_bytes ({self.block_bytes}) >= 0"
            )

    @property
    def num_prompt_blocks(self) -> int:
        return -(-self.num_prompt_tokens // self.block_size)

    def uncached_tokens(self, match: Mapping[str, int], worker: str) -> int:
        return max(0, self.num_prompt_tokens - match.get(worker, 0) * self.block_size)

    def missing_blocks(self, match: Mapping[str, int], worker: str) -> int:
        return max(0, self.num_prompt_blocks - match.get(worker, 0))


@dataclass(frozen=True)
class Placement:
    prefill: str | None  # None: the decode worker prefills too (colocated mode, or kv_aware's local prefill)
    decode: str
    # per candidate weighed (worker names are unique across pools); empty for round_robin
    costs: dict[str, float] = field(default_factory=dict)
    # the chosen pair's cost, part by part (kv_aware: see the module docstring)
    parts: dict[str, float] = field(default_factory=dict)


def _candidates(workers: Sequence[WorkerSnapshot], pool: str) -> list[WorkerSnapshot]:
    up = [w for w in workers if w.up]
    if not up:
        known = f"{len(workers)} known, all down" if workers else "none known"
        raise NoWorkerError(f"no {pool} worker is up ({known})")
    return up


class PlacementPolicy(ABC):
    """Picks one up worker per pool; subclasses say how (``_pick_prefill`` /
    ``_pick_decode``), and may fill ``costs`` for the candidates they weighed."""

    name: str

    def choose(
        self,
        request: PlacementRequest,
        prefill_workers: Sequence[WorkerSnapshot],
        decode_workers: Sequence[WorkerSnapshot],
    ) -> Placement:
        """(P, D) for ``request``; an empty ``prefill_workers`` is colocated mode (P is
        None). Raises NoWorkerError when a pool has no worker up."""
        decode_pool = "decode" if prefill_workers else "colocated"
        decode = _candidates(decode_workers, decode_pool)
        prefill = _candidates(prefill_workers, "prefill") if prefill_workers else None
        costs: dict[str, float] = {}
        p = self._pick_prefill(request, prefill, costs) if prefill else None
        d = self._pick_decode(request, decode, costs, decode_pool)
        return Placement(p, d, costs)

    @abstractmethod
    def _pick_prefill(
        self, request: PlacementRequest, workers: list[WorkerSnapshot], costs: dict[str, float]
    ) -> str: ...

    @abstractmethod
    def _pick_decode(
        self, request: PlacementRequest, workers: list[WorkerSnapshot], costs: dict[str, float], pool: str
    ) -> str: ...


class RoundRobinPolicy(PlacementPolicy):
    """Each pool in turn, by name: the next up worker after the one chosen last, so
    a worker going down or coming back does not reshuffle the others."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: dict[str, str] = {}  # pool -> last chosen name

    def _next(self, pool: str, workers: list[WorkerSnapshot]) -> str:
        names = sorted(w.name for w in workers)
        last = self._last.get(pool)
        pick = next((n for n in names if last is None or n > last), names[0])
        self._last[pool] = pick
        return pick

    def _pick_prefill(self, request, workers, costs):
        return self._next("prefill", workers)

    def _pick_decode(self, request, workers, costs, pool):
        return self._next(pool, workers)


def _least_loaded_key(w: WorkerSnapshot) -> tuple[int, int, str]:
    return (w.load, -w.free_blocks, w.name)


class LeastLoadedPolicy(PlacementPolicy):
    """Fewest running + waiting requests; ties: most free blocks, then name."""

    name = "least_loaded"

    def _pick(self, workers: list[WorkerSnapshot], costs: dict[str, float]) -> str:
        for w in workers:
            costs[w.name] = float(w.load)
        return min(workers, key=_least_loaded_key).name

    def choose(self, request, prefill_workers, decode_workers) -> Placement:
        p = super().choose(request, prefill_workers, decode_workers)
        parts = {"prefill_load": p.costs[p.prefill]} if p.prefill is not None else {}
        return Placement(p.prefill, p.decode, p.costs, {**parts, "decode_load": p.costs[p.decode]})

    def _pick_prefill(self, request, workers, costs):
        return self._pick(workers, costs)

    def _pick_decode(self, request, workers, costs, pool):
        return self._pick(workers, costs)


@dataclass(frozen=True)
class CostParts:
    """One candidate's cost, part by part (what is logged and exported)."""

    uncached_tokens: float = 0.0
    queued_tokens: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    ship_mib: float = 0.0
    total: float = 0.0
    live_prefixes: float = 0.0  # a cold prompt's prefill worker: the conversations it serves now

    def named(self, pool: str) -> dict[str, float]:
        if pool == "local":  # D computes the rest of the prompt and decodes; nothing shipped
            return {"prefill_uncached_tokens": self.uncached_tokens, "prefill_queued_tokens": self.queued_tokens,
                    "decode_running": self.running, "decode_kv_usage": self.kv_usage, "decode_ship_mib": 0.0,
                    "local_cost": self.total}
        if pool == "prefill":
            return {"prefill_uncached_tokens": self.uncached_tokens, "prefill_queued_tokens": self.queued_tokens,
                    "prefill_live_prefixes": self.live_prefixes, "prefill_cost": self.total}
        out = {"decode_running": self.running, "decode_kv_usage": self.kv_usage, "decode_ship_mib": self.ship_mib,
               "decode_cost": self.total}
        if pool == "colocated":
            out.update(prefill_uncached_tokens=self.uncached_tokens, prefill_queued_tokens=self.queued_tokens)
        return out


class KVAwarePolicy(PlacementPolicy):
    """Prefix reuse weighed against the work queued, in tokens (the formula is in the
    module docstring). Weights, all finite and >= 0:

    queue_weight: how much one token already queued on a prefill worker counts against
        one token of this prompt to compute. At 1 both count alike (they delay this
        first token equally); but a token computed again is work added to the pool
        for good, while a queue drains, so the default is 0.2 (the scale simulator at
        32 workers on the Mooncake trace: 1.0 -> 57% of the one-cache ceiling's hits,
        0.5 -> 72%, 0.2 -> 81%, 0.1 -> 84% at TTFT p90 2.27, 2.18, 2.27, 2.56 s).
    cold_match_share: a prefill worker's match under this share of the prompt counts as
        no match (module docstring); 0.25 keeps every follow-up turn (which shares most
        of its prompt with the last one) and drops a shared system-prompt header.
    live_prefix_weight: for a cold prompt, prefill-token equivalent of one live
        conversation on the worker (``live_prefixes``). 128: one conversation more
        outweighs 640 queued tokens (x 0.2), two new chat conversations' first turns
        (~270 tokens each), so new conversations alternate rather than follow the
        shorter queue; a long cold prompt queued (a few thousand tokens) still
        outweighs it, and a prompt anybody holds is never moved by it.
    local_prefill_max_tokens: the most prompt tokens a decode worker may prefill itself
        (local prefill, module docstring); 0, the default: never. Local prefill is
        greedy per turn: a turn it cannot take (the decode worker too full) goes to a
        prefill worker that is as many turns behind as went local, and computes them
        all. Measured on 6 x 10-turn chat at 728 blocks per worker: 3,069 tokens
        computed with it at a one-half KV bound, 4,781 at a one-quarter bound (11 turns
        forced back to stale prefill workers), 4,029 without it; at 120 blocks it
        only hurt. So it is opt-in (256 suits chat turns: 20-60 tokens were left per
        turn), for decode pools with ample KV.
    local_prefill_max_kv_usage: a decode worker prefills locally only while its KV pool
        stays at most this full afterwards: under memory pressure the prefix it holds
        (free, cached blocks) is evicted by the running batch before the request is
        scheduled, and the "short rest" becomes the whole prompt (measured: at 120
        blocks per worker, 47 of 60 chat turns went local and the decode worker computed
        15,870 prompt tokens, 3x what the prefill workers would have; at 0.5, a few
        turns a run still went local there, predicted 22,128 hit tokens and realized
        21,328, and a conversation that alternates between local and remote turns leaves
        its prefill worker a turn behind). 0.25: in the measured chat the decode worker
        was at most 0.24 full after 90% of the decisions at 728 blocks (local prefill
        kept) and above 0.36 after 90% at 120 blocks (local prefill almost never).
    running_weight: prefill-token equivalent of one more sequence on a decode worker.
    kv_usage_weight: prefill-token equivalent of going from an empty to a full KV pool.
    transfer_weight: prefill-token equivalent of shipping one MiB to the decode worker.
    """

    name = "kv_aware"

    def __init__(self, queue_weight: float = 0.2, running_weight: float = 16.0, kv_usage_weight: float = 512.0,
                 transfer_weight: float = 1.0, local_prefill_max_tokens: int = 0,
                 local_prefill_max_kv_usage: float = 0.25, cold_match_share: float = 0.25,
                 live_prefix_weight: float = 128.0) -> None:
        for k, v in (("queue_weight", queue_weight), ("running_weight", running_weight),
                     ("kv_usage_weight", kv_usage_weight), ("transfer_weight", transfer_weight),
                     ("local_prefill_max_tokens", local_prefill_max_tokens), ("cold_match_share", cold_match_share),
                     ("live_prefix_weight", live_prefix_weight)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be finite and >= 0, got {v}")
        for k, v in (("cold_match_share", cold_match_share), ("local_prefill_max_kv_usage", local_prefill_max_kv_usage)):
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise ValueError(f"{k} must be in [0, 1], got {v}")
        self.local_prefill_max_kv_usage = local_prefill_max_kv_usage
        self.live_prefix_weight = live_prefix_weight
        self.cold_match_share = cold_match_share
        self.queue_weight = queue_weight
        self.running_weight = running_weight
        self.kv_usage_weight = kv_usage_weight
        self.transfer_weight = transfer_weight
        self.local_prefill_max_tokens = int(local_prefill_max_tokens)
        self._ties: dict[str, int] = {}  # per pool: rotates which equal-cost worker is preferred
        self._chosen: dict[str, CostParts] = {}

    # ---- the named cost -----------------------------------------------------------------

    def held_tokens(self, request: PlacementRequest, match: Mapping[str, int], worker: str) -> int:
        """Prompt tokens ``worker`` holds as far as the cost is concerned: its match, or 0
        when that is under ``cold_match_share`` of the prompt."""
        held = min(match.get(worker, 0) * request.block_size, request.num_prompt_tokens)
        return held if held and held >= self.cold_match_share * request.num_prompt_tokens else 0

    def prefill_cost(self, request: PlacementRequest, w: WorkerSnapshot, match: Mapping[str, int] | None = None,
                     cold: bool = False) -> CostParts:
        """``cold``: no prefill worker holds the prompt (the live-prefix term applies)."""
        match = request.prefill_match if match is None else match
        uncached = request.num_prompt_tokens - self.held_tokens(request, match, w.name)
        queued = self.queue_weight * w.queued_tokens
        live = self.live_prefix_weight * w.live_prefixes if cold else 0.0
        return CostParts(uncached_tokens=uncached, queued_tokens=w.queued_tokens, live_prefixes=w.live_prefixes if cold else 0,
                         total=uncached + queued + live)

    def decode_cost(self, request: PlacementRequest, w: WorkerSnapshot, ship: bool = True) -> CostParts:
        missing = request.missing_blocks(request.decode_match, w.name)
        usage_after = 1.0 - (w.free_blocks - missing) / w.total_blocks
        mib = missing * request.block_bytes / 2**20 if ship else 0.0
        total = self.running_weight * w.load + self.kv_usage_weight * usage_after + self.transfer_weight * mib
        return CostParts(running=w.load, kv_usage=usage_after, ship_mib=mib, total=total)

    def colocated_cost(self, request: PlacementRequest, w: WorkerSnapshot) -> CostParts:
        p, d = self.prefill_cost(request, w, request.decode_match), self.decode_cost(request, w, ship=False)
        return CostParts(p.uncached_tokens, p.queued_tokens, d.running, d.kv_usage, 0.0, p.total + d.total)

    # ---- choosing -----------------------------------------------------------------------

    def choose(self, request, prefill_workers, decode_workers) -> Placement:
        self._chosen = {}
        p = super().choose(request, prefill_workers, decode_workers)
        parts = {}
        for pool, c in self._chosen.items():
            parts.update(c.named(pool))
        if not prefill_workers:
            return Placement(p.prefill, p.decode, p.costs, parts)
        if not self.local_prefill_max_tokens:
            return Placement(p.prefill, p.decode, p.costs, {**parts, "local_prefill": 0.0})
        remote = parts["prefill_cost"] + parts["decode_cost"]
        local = self._local_candidate(request, prefill_workers, decode_workers)
        if local is None or local[1].total >= remote:
            return Placement(p.prefill, p.decode, p.costs, {**parts, "local_prefill": 0.0})
        d, c = local
        log.debug("local prefill on %s: cost %.1f < remote %s -> %s %.1f", d, c.total, p.prefill, p.decode, remote)
        return Placement(None, d, {**p.costs, f"{d}/local": c.total}, {**c.named("local"), "local_prefill": 1.0})

    def local_cost(self, request: PlacementRequest, w: WorkerSnapshot) -> CostParts:
        """``local(D)``: D prefills the rest of the prompt itself, nothing is shipped."""
        return self.colocated_cost(request, w)

    def _local_candidate(self, request: PlacementRequest, prefill: Sequence[WorkerSnapshot],
                         decode: Sequence[WorkerSnapshot]) -> tuple[str, CostParts] | None:
        """The cheapest decode worker allowed to prefill this request itself: up, with
        room for the blocks it lacks, holding more leading blocks than every up prefill
        worker, with at most ``local_prefill_max_tokens`` left to compute, and its KV
        pool at most ``local_prefill_max_kv_usage`` full afterwards."""
        dm, nb = request.decode_match, request.num_prompt_blocks
        if not dm or request.num_prompt_tokens - max(dm.values()) * request.block_size > self.local_prefill_max_tokens:
            return None  # no decode worker is close enough (the common case: checked first, O(1))
        pm = request.prefill_match
        best_p = max((pm[w.name] for w in prefill if w.up and w.name in pm), default=0)
        best = None
        for w in decode:
            held = dm.get(w.name, 0)
            if (not w.up or held <= best_p or w.free_blocks < nb - held
                    or request.uncached_tokens(dm, w.name) > self.local_prefill_max_tokens):
                continue
            c = self.local_cost(request, w)
            if c.kv_usage > self.local_prefill_max_kv_usage:
                continue
            if best is None or (c.total, w.name) < (best[1].total, best[0]):
                best = (w.name, c)
        return best

    def _totals(self, request: PlacementRequest, pool: str, workers: Sequence[WorkerSnapshot]) -> list[float]:
        """The cost's total alone for every worker, inlined in comprehensions: this runs
        for every worker of a 128-worker pool on every request (``prefill_cost`` /
        ``decode_cost`` give the parts; the unit tests hold the two equal)."""
        tokens, bs, nb = request.num_prompt_tokens, request.block_size, request.num_prompt_blocks
        qw, rw, kw = self.queue_weight, self.running_weight, self.kv_usage_weight
        cold = self.cold_match_share * tokens  # fewer held tokens than this count as none
        if pool == "prefill":
            # held tokens per worker that holds any (the match lists only those)
            held = {n: h for n, b in request.prefill_match.items() if (h := min(b * bs, tokens)) and h >= cold}
            if not held:  # a cold prompt: balanced on the workers' live conversations too
                lw = self.live_prefix_weight
                return [tokens + qw * w.queued_tokens + lw * w.live_prefixes for w in workers]
            get = held.get
            return [tokens - get(w.name, 0) + qw * w.queued_tokens for w in workers]
        dm = request.decode_match
        get = dm.get
        tw = self.transfer_weight * request.block_bytes / 2**20 if pool != "colocated" else 0.0
        out = [rw * (w.running + w.waiting) + kw * (1.0 - (w.free_blocks - (m := max(0, nb - get(w.name, 0)))) / w.total_blocks)
               + tw * m for w in workers]
        if pool == "colocated":
            for i, w in enumerate(workers):
                h = min(get(w.name, 0) * bs, tokens)
                out[i] += (tokens - h if h and h >= cold else tokens) + qw * w.queued_tokens
        return out

    def _parts(self, request: PlacementRequest, pool: str, w: WorkerSnapshot) -> CostParts:
        if pool == "prefill":
            cold = not any(self.held_tokens(request, request.prefill_match, n) for n in request.prefill_match)
            return self.prefill_cost(request, w, cold=cold)
        return self.colocated_cost(request, w) if pool == "colocated" else self.decode_cost(request, w)

    def _cheapest(self, request: PlacementRequest, workers: list[WorkerSnapshot], costs: dict[str, float], pool: str) -> str:
        totals = self._totals(request, pool, workers)
        costs.update(zip([w.name for w in workers], totals))
        lowest = min(totals)
        tied = [w for w, c in zip(workers, totals) if c == lowest]
        # exact ties (cold prompts on an idle pool): the fewest cached blocks, then
        # rotate over the still tied workers in name order (the turn advances on ties
        # only), so new prefixes spread over the pool
        if len(tied) > 1:
            fewest = min(w.cached_blocks for w in tied)
            tied = sorted((w for w in tied if w.cached_blocks == fewest), key=lambda w: w.name)
            turn = self._ties[pool] = self._ties.get(pool, -1) + 1
            best = tied[turn % len(tied)]
        else:
            best = tied[0]
        if log.isEnabledFor(logging.DEBUG):
            for w in workers:
                p = self._parts(request, pool, w)
                log.debug("%s %s: cost %.1f = uncached %.0f + %g x queued %.0f tok + %g x live %d | %g x running %d"
                          " + %g x kv usage %.2f + %g x ship %.2f MiB", pool, w.name, p.total, p.uncached_tokens,
                          self.queue_weight, p.queued_tokens, self.live_prefix_weight, p.live_prefixes,
                          self.running_weight, p.running, self.kv_usage_weight, p.kv_usage, self.transfer_weight,
                          p.ship_mib)
        self._chosen[pool] = self._parts(request, pool, best)
        return best.name

    def _pick_prefill(self, request, workers, costs):
        return self._cheapest(request, workers, costs, "prefill")

    def _pick_decode(self, request, workers, costs, pool):
        nb, dm = request.num_prompt_blocks, request.decode_match
        roomy = [w for w in workers if w.free_blocks >= nb - dm.get(w.name, 0)]
        if not roomy:
            best = min(workers, key=lambda w: (-w.free_blocks, w.load, w.name))
            log.debug("%s: no worker has room for %d blocks; taking %s (most free: %d)",
                      pool, request.num_prompt_blocks, best.name, best.free_blocks)
            parts = self._chosen[pool] = self._parts(request, pool, best)
            costs[best.name] = parts.total
            return best.name
        return self._cheapest(request, roomy, costs, pool)


# Every ``part`` label value of the kvrelay_router_placement_cost histogram (Placement.parts).
COST_PARTS = (
    "prefill_uncached_tokens", "prefill_queued_tokens", "prefill_live_prefixes", "prefill_cost",  # kv_aware, the chosen P (or D, local)
    "decode_running", "decode_kv_usage", "decode_ship_mib", "decode_cost",  # kv_aware, the chosen D
    "local_cost", "local_prefill",  # kv_aware: a local prefill's total; 1 for a local prefill, 0 for a pair
    "prefill_load", "decode_load",  # least_loaded
)

POLICIES: dict[str, Callable[..., PlacementPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    KVAwarePolicy.name: KVAwarePolicy,
}


def make_policy(name: str = DEFAULT_POLICY, **options) -> PlacementPolicy:
    """A fresh policy by name; ``options`` go to its constructor (kv_aware's weights)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}") from None
    return factory(**options)
