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

``kv_aware`` costs, in prompt tokens (lower is better)::

    prefill_cost(w) = uncached_tokens(w) + load_weight * (running + waiting)
    decode_cost(w)  = missing_tokens(w)  + decode_load_weight * (running + waiting)
                      + kv_usage_weight * kv_usage_after(w)

    uncached_tokens(w) = max(0, prompt_tokens - prefill_match[w] * block_size)
    missing_tokens(w)  = max(0, prompt_tokens - decode_match[w] * block_size)  (to ship)
    kv_usage_after(w)  = 1 - (free_blocks - missing_blocks(w)) / total_blocks   (0..1)

Candidates first pass two filters, so a popular prefix cannot pile every request onto
one worker:

* room (decode only): ``free_blocks >= missing_blocks``; if nobody has room, the
  worker with the most free blocks is taken (its reserve may still fail and retry);
* balance: ``running + waiting <= min_load + balance_slack`` over the candidates left
  (SGLang's cache-aware router has a similar absolute balance threshold).
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

    def __post_init__(self) -> None:
        if min(self.running, self.waiting, self.free_blocks) < 0 or self.total_blocks <= 0:
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

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0 or self.block_size <= 0:
            raise ValueError(
                f"num_prompt_tokens ({self.num_prompt_tokens}) must be >= 0 and block_size ({self.block_size}) > 0"
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
    prefill: str | None  # None: colocated (the decode worker prefills too)
    decode: str
    # per candidate weighed (worker names are unique across pools); empty for round_robin
    costs: dict[str, float] = field(default_factory=dict)


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

    def _pick_prefill(self, request, workers, costs):
        return self._pick(workers, costs)

    def _pick_decode(self, request, workers, costs, pool):
        return self._pick(workers, costs)


class KVAwarePolicy(PlacementPolicy):
    """Prefix reuse weighed against load (formulas in the module docstring).

    load_weight: prompt tokens one queued or running request on a prefill worker
        costs (default 256: a worker must hold 256 more prompt tokens to be worth
        one more request ahead in its queue).
    balance_slack: requests above the least-loaded candidate a worker may carry and
        still be chosen (default 8).
    decode_load_weight: same as load_weight, for decode workers (default 256).
    kv_usage_weight: prompt tokens that going from an empty to a full KV pool costs
        on a decode worker (default 1024).
    cache_threshold: below this share of the prompt held by the best prefill worker,
        the prompt is treated as new work and placed by load (ties rotate), so new
        prefixes spread over the pool (default 0.5).
    """

    name = "kv_aware"

    def __init__(
        self,
        load_weight: float = 256.0,
        balance_slack: int = 8,
        decode_load_weight: float = 256.0,
        kv_usage_weight: float = 1024.0,
        cache_threshold: float = 0.5,
    ) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        self.cache_threshold = cache_threshold
        for k, v in (("load_weight", load_weight), ("balance_slack", balance_slack),
                     ("decode_load_weight", decode_load_weight), ("kv_usage_weight", kv_usage_weight)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be finite and >= 0, got {v}")
        self.load_weight = load_weight
        self.balance_slack = balance_slack
        self._ties: dict[str, int] = {}  # per pool: rotates which equal-cost worker is preferred
        self.decode_load_weight = decode_load_weight
        self.kv_usage_weight = kv_usage_weight

    # ---- the two named costs ----------------------------------------------------------

    def prefill_cost(self, request: PlacementRequest, w: WorkerSnapshot) -> float:
        return request.uncached_tokens(request.prefill_match, w.name) + self.load_weight * w.load

    def decode_cost(self, request: PlacementRequest, w: WorkerSnapshot) -> float:
        missing = request.missing_blocks(request.decode_match, w.name)
        usage_after = 1.0 - (w.free_blocks - missing) / w.total_blocks
        return (
            request.uncached_tokens(request.decode_match, w.name)
            + self.decode_load_weight * w.load
            + self.kv_usage_weight * usage_after
        )

    # ---- choosing ---------------------------------------------------------------------

    def _balanced(self, workers: list[WorkerSnapshot], pool: str) -> list[WorkerSnapshot]:
        bound = min(w.load for w in workers) + self.balance_slack
        kept = [w for w in workers if w.load <= bound]
        for w in workers:
            if w.load > bound:
                log.debug("%s %s: load %d over balance bound %d, skipped", pool, w.name, w.load, bound)
        return kept

    def _cheapest(
        self, workers: list[WorkerSnapshot], cost: Callable[[WorkerSnapshot], float], costs: dict[str, float], pool: str,
        cold: bool = False,
    ) -> str:
        """The cheapest worker; ``cold``: ignore the cost's prefix term and pick by load
        (the costs are still reported)."""
        scored = []
        names = sorted(w.name for w in workers)
        turn = self._ties[pool] = self._ties.get(pool, 0) + 1
        for w in workers:
            c = costs[w.name] = cost(w)
            log.debug("%s %s: cost %.1f (running %d, waiting %d, free %d/%d)",
                      pool, w.name, c, w.running, w.waiting, w.free_blocks, w.total_blocks)
            # Ties (a prompt no worker holds, equal load) rotate over the workers, so new
            # prefixes spread over the pool instead of piling onto the first name.
            rotation = (names.index(w.name) - turn) % len(names)
            key = (w.load, rotation, w.cached_blocks, w.name) if cold else (c, w.load, rotation, w.cached_blocks, -w.free_blocks, w.name)
            scored.append((key, w.name))
        return min(scored)[1]

    def _pick_prefill(self, request, workers, costs):
        kept = self._balanced(workers, "prefill")
        best = max(request.prefill_match.get(w.name, 0) for w in kept) * request.block_size
        if best < self.cache_threshold * request.num_prompt_tokens:
            # No worker holds a meaningful share of this prompt (a short shared header
            # does not count): place it like new work, by load, spreading new prefixes
            # over the pool (SGLang's cache-aware router uses the same threshold idea).
            return self._cheapest(kept, lambda w: self.prefill_cost(request, w), costs, "prefill (cold)", cold=True)
        return self._cheapest(kept, lambda w: self.prefill_cost(request, w), costs, "prefill")

    def _pick_decode(self, request, workers, costs, pool):
        roomy = [w for w in workers if w.free_blocks >= request.missing_blocks(request.decode_match, w.name)]
        if not roomy:
            best = min(workers, key=lambda w: (-w.free_blocks, w.load, w.name))
            log.debug("%s: no worker has room for %d blocks; taking %s (most free: %d)",
                      pool, request.num_prompt_blocks, best.name, best.free_blocks)
            costs[best.name] = self.decode_cost(request, best)
            return best.name
        kept = self._balanced(roomy, pool)
        return self._cheapest(kept, lambda w: self.decode_cost(request, w), costs, pool)


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
