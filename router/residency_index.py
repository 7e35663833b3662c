"""The residency index: which worker of a pool holds which KV blocks, from their KV events.

A prefix tree over chained block hashes, one node per block hash; each node records
the workers that hold that block. Because a block's hash covers its whole prefix (see
``cluster.block_hash``), a hash names one path from the root, so the index also keeps a
``hash -> node`` map and looks a request's blocks up directly::

    root
     ├── a1 {prefill-0, prefill-1}
     │    ├── b2 {prefill-0}
     │    │    └── c3 {prefill-0}
     │    └── d2 {prefill-1}
     └── e1 {}                      <- prefill-1 evicted e1 but still holds f2
          └── f2 {prefill-1}

    match([a1, b2, c3]) -> {prefill-0: 3, prefill-1: 1}
    match([e1, f2])     -> {prefill-0: 0, prefill-1: 0}   (f2 is useless without e1)

A worker's count is the number of *leading* blocks it holds: it stops at the first
block the worker lacks, even if it holds later ones (its block manager may evict a
parent while a child is still referenced).

Layout. A 128-worker cluster holds millions of (worker, block) entries and reports
thousands of blocks per second per worker, so the tree lives in flat numpy arrays, not
Python objects (about 75 bytes per entry at 1M entries instead of about 580)::

    _node_of   U64Table   block hash -> node id                        (router/u64_table.py)
    _parent    [nodes] int32            parent node id; ROOT, UNKNOWN (a placeholder: a
                                        parent named by an event before its own stored
                                        event arrived) or FREE
    _bits      [nodes, words] uint64    bit w set: worker id w holds the block
    _entries   U64Table   (node << 16 | worker id) -> LRU stamp (a clock; larger = newer)

A match gathers the bit rows of the prompt's nodes and AND-accumulates them down the
chain: the count of worker w is the number of leading rows where bit w survives.
Events are applied a batch at a time (``apply`` takes one worker's drained events):
within a batch the last event naming a block decides whether the worker holds it,
which is exactly what applying them one by one leaves. Nodes nobody holds and that
lead to nothing held are reclaimed in bulk (``_collect``) once enough entries were
removed, not one by one.

Events. Each worker numbers its events 1, 2, 3, ... (and starts at 1 again when it
restarts). They are applied in order; a gap or a sequence number that goes backwards
puts that worker in ``RESYNCING`` mode: its entries are dropped at once (never matched
while untrusted), its further events are dropped, and the caller fetches the worker's
``KVSnapshot`` and calls ``resync``. After a resync at ``snapshot.seq = s`` events with
seq <= s are ignored (the snapshot has them) until seq s + 1 arrives, which continues
normally. A worker that restarts inside that window (before it emits s + 1) cannot be
told apart from stale events: callers that see a restart by other means (the worker's
``started_at`` changed) call ``invalidate`` or ``remove_worker``.

Memory bound. ``max_blocks`` caps the number of (worker, block) entries, not nodes: the
entries are what grows with workers x cache size, and a node lives only while some
worker holds it or one of its descendants. Over the cap, the least recently matched or
stored entries are evicted (the cap is checked after each ``apply`` batch, so a batch
may pass it by its own size until then). Within one touched chain the head is the most
recent, so a chain loses its tail first. An evicted entry makes the index under-report
that worker's prefix (a conservative miss: placement sees less cache than there is,
never more), so after ``evictions > 0`` the index is a subset of the truth rather than
exact.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.block_hash import BlockHash
from cluster.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVSnapshot
from router.u64_table import U64Table

assert np.little_endian, "the worker bit rows are unpacked as little-endian bytes"

DEFAULT_MAX_BLOCKS = 1_000_000  # (worker, block) entries; about 75 bytes each (bench/index_scale.py)

ROOT, UNKNOWN, FREE = -1, -2, -3  # _parent values that are not node ids
PARENT_ROOT = "root"  # what ``parent_of`` says for a chain's first block
_WID_BITS = 16  # worker ids per pool < 65536
_MIN_COLLECT = 4096  # removed entries before nodes are reclaimed (and 1/4 of the nodes)


class WorkerMode(str, enum.Enum):
    EXACT = "exact"  # every event applied in order: entries are what the worker reported
    RESYNCING = "resyncing"  # a gap or a restart was seen: waiting for ``resync``


@dataclass(frozen=True)
class MatchResult:
    """Per worker, how many leading blocks of the looked-up chain it holds. Only
    workers in ``EXACT`` mode appear (a resyncing worker's cache is unknown)."""

    blocks: Mapping[str, int]
    num_queried: int  # length of the looked-up chain

    def num_blocks(self, worker: str) -> int:
        return self.blocks.get(worker, 0)

    def num_tokens(self, worker: str, block_size: int) -> int:
        return self.blocks.get(worker, 0) * block_size

    def best(self) -> tuple[str, int] | None:
        """The worker with the longest match (ties: by name), or None if nobody matched."""
        top = min(self.blocks.items(), key=lambda kv: (-kv[1], kv[0]), default=None)
        return top if top is not None and top[1] > 0 else None


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did with one worker's batch of events."""

    worker: str
    applied: int = 0
    ignored: int = 0  # already covered by the last snapshot (seq <= snapshot.seq)
    dropped: int = 0  # arrived while the worker needed a resync
    needs_resync: bool = False
    reason: str | None = None  # why the worker needs a resync


class _WorkerState:
    __slots__ = ("wid", "mode", "last_seq", "stale_until", "reason")

    def __init__(self, wid: int) -> None:
        self.wid = wid  # bit position in _bits, low bits of _entries keys
        self.mode = WorkerMode.EXACT
        self.last_seq = 0  # a new worker's first event is seq 1
        self.stale_until: int | None = None  # after a resync: seq <= this is already applied
        self.reason: str | None = None


class _Batch:
    """One worker's accepted events, flattened: every block named, in event order.
    Per stored event only its first block's parent is kept: the others' parents are
    the blocks before them in the same chain."""

    __slots__ = ("hashes", "runs", "first_parents", "has_parent")

    def __init__(self) -> None:
        self.hashes: list[int] = []  # every stored or removed block, in order
        self.runs: list[tuple[bool, int]] = []  # (is_store, length) per event
        self.first_parents: list[int] = []  # per stored event: its first block's parent (0: root)
        self.has_parent: list[bool] = []  # per stored event: False when the chain starts at the root

    def add(self, ev: BlockStored | BlockRemoved) -> None:
        hs = ev.block_hashes
        if not hs:
            return
        self.hashes.extend(hs)
        if type(ev) is BlockStored:
            self.runs.append((True, len(hs)))
            p = ev.parent_hash
            self.first_parents.append(0 if p is None else p)
            self.has_parent.append(p is not None)
        else:
            self.runs.append((False, len(hs)))


_EVENT_TYPES = (BlockStored, BlockRemoved, AllBlocksCleared)


def _u64(hashes: Sequence[int]) -> np.ndarray:
    return np.array(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, np.uint64)


class ResidencyIndex:
    """Exact (event-fed) residency of KV blocks across the workers of one pool."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        self.max_blocks = max_blocks
        self.evictions = 0
        self._node_of = U64Table(np.int32, max_load=0.6)  # short probes: a prompt's unknown tail misses
        self._parent = np.full(1024, FREE, np.int32)  # [node capacity]
        self._bits = np.zeros((1024, 1), np.uint64)  # [node capacity, words]
        self._hw = 0  # node ids in use are < _hw
        self._free = np.zeros(0, np.int64)  # reclaimed node ids below _hw
        self._entries = U64Table(np.int64)
        self._clock = 0
        self._workers: dict[str, _WorkerState] = {}
        self._names: dict[int, str] = {}  # worker id -> name
        self._counts = np.zeros(64, np.int64)  # [worker id] entries held
        self._exact: list[tuple[str, int]] | None = None  # cache of _exact_workers()
        self._removed_since_collect = 0
        self._queue_keys = np.zeros(0, np.uint64)  # eviction candidates, oldest first
        self._queue_stamps = np.zeros(0, np.int64)

    @classmethod
    def create_simulated(cls, max_blocks: int = 64) -> ResidencyIndex:
        """A small index for tests and notebooks."""
        return cls(max_blocks=max_blocks)

    # ---- queries ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """(worker, block) entries held now (bounded by ``max_blocks``)."""
        return len(self._entries)

    @property
    def num_nodes(self) -> int:
        """Tree nodes, root excluded (placeholders included), after reclaiming the
        nodes that lead to nothing held."""
        self._collect()
        return self._hw - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays (capacity included)."""
        return self._node_of.nbytes + self._entries.nbytes + self._parent.nbytes + self._bits.nbytes

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def worker_mode(self, worker: str) -> WorkerMode:
        if worker not in self._workers:
            raise KeyError(f"unknown worker {worker!r}; known: {self.workers}")
        return self._workers[worker].mode

    @property
    def modes(self) -> dict[str, str]:
        return {w: st.mode.value for w, st in sorted(self._workers.items())}

    @property
    def mode(self) -> str:
        """'exact' when every worker is exact, else 'resyncing'."""
        if all(st.mode is WorkerMode.EXACT for st in self._workers.values()):
            return WorkerMode.EXACT.value
        return WorkerMode.RESYNCING.value

    def needs_resync(self) -> list[str]:
        """Workers waiting for ``resync`` (the caller fetches their snapshots)."""
        return sorted(w for w, st in self._workers.items() if st.mode is WorkerMode.RESYNCING)

    def last_seq(self, worker: str) -> int:
        return self._workers[worker].last_seq

    def num_blocks_of(self, worker: str) -> int:
        """How many blocks the index holds for ``worker`` (O(1))."""
        st = self._workers.get(worker)
        return int(self._counts[st.wid]) if st else 0

    def blocks_of(self, worker: str) -> frozenset[BlockHash]:
        """Every block ``worker`` holds (a scan: for checks and resync, not per request)."""
        st = self._workers.get(worker)
        if st is None or self._counts[st.wid] == 0:
            return frozenset()
        keys, nodes = self._node_of.items()
        held = (self._bits[nodes, st.wid >> 6] >> np.uint64(st.wid & 63)) & np.uint64(1)
        return frozenset(keys[held.astype(bool)].tolist())

    def match(self, block_hashes: Sequence[BlockHash], *, touch: bool = True) -> MatchResult:
        """Leading blocks of ``block_hashes`` held by each exact worker. ``touch`` marks
        the matched entries most recently used (LRU order only; what is resident never
        changes); pass ``touch=False`` for a pure query."""
        exact = self._exact_workers()
        if not exact:
            return MatchResult({}, len(block_hashes))
        nodes = self._node_of.get(_u64(block_hashes))  # [n] int32, -1: unknown hash
        missing = np.flatnonzero(nodes < 0)
        nodes = nodes[: missing[0] if missing.size else len(nodes)]
        if nodes.size:
            held = np.bitwise_and.accumulate(self._bits[nodes], axis=0)  # [n, words]
            per_wid = np.unpackbits(held.view(np.uint8), axis=1, bitorder="little").sum(axis=0).tolist()
            counts = {w: per_wid[wid] for w, wid in exact}
        else:
            counts = {w: 0 for w, _ in exact}
        if touch and nodes.size:
            self._touch_matches(nodes, counts)
        return MatchResult(counts, len(block_hashes))

    def touch(self, worker: str, block_hashes: Sequence[BlockHash], num_blocks: int) -> None:
        """Mark ``worker``'s entries for the first ``num_blocks`` blocks of the chain
        most recently used (tail first), as ``match`` does for every matching worker:
        the router touches only the worker it chose (cheaper at 128 workers)."""
        st = self._workers.get(worker)
        if st is None or num_blocks <= 0 or st.mode is not WorkerMode.EXACT:
            return
        nodes = self._node_of.get(_u64(block_hashes[:num_blocks]))
        if (nodes < 0).any():
            raise ValueError(f"{worker} cannot hold {num_blocks} blocks of a chain the index does not know")
        self._touch_matches(nodes, {worker: num_blocks})

    def _exact_workers(self) -> list[tuple[str, int]]:
        """(name, worker id) of the exact workers, by name; rebuilt after a change."""
        if self._exact is None:
            self._exact = [(w, st.wid) for w, st in sorted(self._workers.items()) if st.mode is WorkerMode.EXACT]
        return self._exact

    # ---- introspection (scans; for tests and debugging) ---------------------------------

    def parent_of(self, block_hash: BlockHash) -> BlockHash | str | None:
        """The parent block's hash, ``PARENT_ROOT``, or None for a placeholder (a
        parent named before its own stored event)."""
        node = self._node_id(block_hash)
        p = int(self._parent[node])
        if p == ROOT:
            return PARENT_ROOT
        return None if p == UNKNOWN else self._hash_of_nodes(np.array([p]))[0]

    def children_of(self, block_hash: BlockHash | None) -> set[BlockHash]:
        """Blocks whose parent is ``block_hash`` (None: the root)."""
        self._collect()
        target = ROOT if block_hash is None else self._node_id(block_hash)
        return set(self._hash_of_nodes(np.flatnonzero(self._parent[: self._hw] == target)))

    def holders_of(self, block_hash: BlockHash) -> set[str]:
        row = self._bits[self._node_id(block_hash)]
        return {name for wid, name in self._names.items() if (int(row[wid >> 6]) >> (wid & 63)) & 1}

    def lru_order(self) -> list[tuple[str, BlockHash]]:
        """Every (worker, block) entry, least recently used first."""
        keys, stamps = self._entries.items()
        keys = keys[np.argsort(stamps, kind="stable")]
        hashes = self._hash_of_nodes((keys >> np.uint64(_WID_BITS)).astype(np.int64))
        wids = (keys & np.uint64((1 << _WID_BITS) - 1)).tolist()
        return [(self._names[w], h) for w, h in zip(wids, hashes)]

    def _node_id(self, block_hash: BlockHash) -> int:
        node = int(self._node_of.get(_u64([block_hash]))[0])
        if node < 0:
            raise KeyError(f"block {block_hash:#x} is not in the index")
        return node

    def _hash_of_nodes(self, nodes: np.ndarray) -> list[int]:
        keys, ids = self._node_of.items()
        by_node = np.zeros(self._hw, np.uint64)
        by_node[ids] = keys
        return by_node[nodes].tolist()

    # ---- events -----------------------------------------------------------------------

    def apply(self, worker: str, events: Iterable[KVEvent]) -> ApplyResult:
        """Apply one worker's events in order (see the module docstring for gaps)."""
        return self.apply_many({worker: events})[worker]

    def apply_many(self, events: Mapping[str, Iterable[KVEvent]]) -> dict[str, ApplyResult]:
        """Apply several workers' drained events in one vectorised pass: the same
        result as ``apply`` per worker in the mapping's order, at a fraction of the
        cost per block (the router's event loop drains every worker, then applies)."""
        results, batches = {}, []
        for worker, evs in events.items():
            st = self._state(worker)
            batch, results[worker] = self._accept(worker, st, evs)
            if batch.runs and st.mode is WorkerMode.EXACT:
                batches.append((st, batch))
        if batches:
            self._apply_batches(batches)
        self._enforce_cap()
        return results

    def _accept(self, worker: str, st: _WorkerState, events: Iterable[KVEvent]) -> tuple[_Batch, ApplyResult]:
        """Sequence checks, event by event; what passes is collected for one pass."""
        applied = ignored = dropped = 0
        batch = _Batch()
        for ev in events:
            if type(ev) not in _EVENT_TYPES and not isinstance(ev, _EVENT_TYPES):
                raise TypeError(f"not a KV event: {ev!r}")
            if st.mode is WorkerMode.RESYNCING:
                dropped += 1
                continue
            if st.stale_until is not None and ev.seq <= st.stale_until:
                ignored += 1
                continue
            if ev.seq != st.last_seq + 1:
                kind = "gap" if ev.seq > st.last_seq else "sequence went backwards (worker restarted?)"
                self.invalidate(worker, f"{kind}: expected seq {st.last_seq + 1}, got {ev.seq}")
                batch = _Batch()  # invalidate dropped everything the worker held anyway
                dropped += 1
                continue
            st.stale_until = None
            if type(ev) is AllBlocksCleared:
                batch = _Batch()  # what the batch stored so far is cleared too
                self._clear_worker(st)
            else:
                batch.add(ev)
            st.last_seq = ev.seq
            applied += 1
        return batch, ApplyResult(worker, applied, ignored, dropped, st.mode is WorkerMode.RESYNCING, st.reason)

    def invalidate(self, worker: str, reason: str = "invalidated by caller") -> None:
        """Stop trusting ``worker`` until ``resync``: its entries are dropped now."""
        st = self._state(worker)
        self._clear_worker(st)
        st.mode, st.reason, st.stale_until = WorkerMode.RESYNCING, reason, None
        self._exact = None

    def resync(self, worker: str, snapshot: KVSnapshot) -> None:
        """Replace everything known about ``worker`` with its snapshot."""
        st = self._state(worker)
        self._clear_worker(st)
        if snapshot.blocks:
            hashes = [h for h, _ in snapshot.blocks]
            parents = [0 if p is None else p for _, p in snapshot.blocks]
            self._link(_u64(hashes), _u64(parents), np.array([p is not None for _, p in snapshot.blocks]))
            # LRU: deepest blocks oldest, so the cap trims chain tails before heads.
            depth = _depths(snapshot.blocks)
            order = sorted(range(len(hashes)), key=lambda i: -depth[hashes[i]])
            stamps = np.empty(len(hashes), np.int64)
            stamps[order] = self._clock + np.arange(len(hashes))
            self._clock += len(hashes)
            keys = _entry_keys(self._node_of.get(_u64(hashes)).astype(np.int64), st.wid)
            uniq, last = _last_occurrence(keys)
            self._add_keys(uniq, stamps[last])
        self._enforce_cap()
        st.mode, st.reason = WorkerMode.EXACT, None
        st.last_seq = st.stale_until = snapshot.seq
        self._exact = None

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` entirely (scaled down or replaced)."""
        st = self._workers.pop(worker, None)
        if st is not None:
            self._clear_worker(st)
            del self._names[st.wid]
            self._exact = None

    # ---- internals: workers ---------------------------------------------------------

    def _state(self, worker: str) -> _WorkerState:
        st = self._workers.get(worker)
        if st is None:
            wid = next(i for i in range(len(self._names) + 1) if i not in self._names)
            if wid >= 1 << _WID_BITS:
                raise ValueError(f"a pool holds at most {1 << _WID_BITS} workers")
            if wid >= self._bits.shape[1] * 64:  # one more word of worker bits per node
                self._bits = np.concatenate([self._bits, np.zeros((len(self._bits), 1), np.uint64)], axis=1)
            if wid >= len(self._counts):
                self._counts = np.concatenate([self._counts, np.zeros(len(self._counts), np.int64)])
            st = self._workers[worker] = _WorkerState(wid)
            self._names[wid] = worker
            self._exact = None
        return st

    def _clear_worker(self, st: _WorkerState) -> None:
        if self._counts[st.wid] == 0:
            return
        word, bit = st.wid >> 6, np.uint64(1) << np.uint64(st.wid & 63)
        nodes = np.flatnonzero(self._bits[: self._hw, word] & bit)
        self._drop_keys(_entry_keys(nodes, st.wid))

    # ---- internals: applying a batch ------------------------------------------------

    def _apply_batches(self, batches: list[tuple[_WorkerState, _Batch]]) -> None:
        hashes: list[int] = []
        first_parents: list[int] = []
        has_parent: list[bool] = []
        runs: list[tuple[bool, int]] = []
        run_wids: list[int] = []
        for st, b in batches:
            hashes += b.hashes
            first_parents += b.first_parents
            has_parent += b.has_parent
            runs += b.runs
            run_wids += [st.wid] * len(b.runs)
        kinds = np.array([k for k, _ in runs])
        lens = np.array([n for _, n in runs])
        is_store = np.repeat(kinds, lens)  # [n] bool, every block named, in event order
        wids = np.repeat(np.array(run_wids), lens)  # [n]
        # LRU stamps of the stored blocks: each stored event touches its chain tail
        # first, so its head ends up the most recent.
        slens = lens[kinds]  # [stored events]
        starts = np.cumsum(slens) - slens  # each stored event's first block, among the stored blocks
        ends = self._clock + np.cumsum(slens) - 1  # the stamp of each event's head
        offs = np.arange(int(slens.sum())) - np.repeat(starts, slens)
        stamp_of_op = np.full(len(is_store), -1, np.int64)
        stamp_of_op[is_store] = np.repeat(ends, slens) - offs
        self._clock += int(slens.sum())
        n = len(is_store)
        fhp = np.array(has_parent, bool)
        # one probe of the node table per distinct block named (blocks and parents)
        ids = self._node_ids(np.concatenate([_u64(hashes), _u64(first_parents)[fhp]]),
                             np.concatenate([is_store, np.ones(int(fhp.sum()), bool)]))
        nodes = ids[:n]  # -1: a removed block the index never saw
        if slens.size:
            child = nodes[is_store]
            parent = np.empty(len(child), np.int64)
            parent[1:] = child[:-1]  # within a chain: the block before
            first = np.full(len(slens), ROOT, np.int64)
            first[fhp] = ids[n:]
            parent[starts] = first
            self._learn_parents(child, parent)
        known = nodes >= 0
        keys = _entry_keys(nodes[known], wids[known])
        # per (block, worker), the last event naming it decides
        uniq, last = _last_occurrence(keys)
        keep = is_store[known][last]
        self._add_keys(uniq[keep], stamp_of_op[known][last[keep]])
        self._drop_keys(uniq[~keep])

    def _node_ids(self, keys: np.ndarray, create: np.ndarray) -> np.ndarray:
        """Node id of each key ([k] uint64, repeats allowed), -1 where absent; absent
        keys flagged in ``create`` get new nodes (placeholders: parent UNKNOWN)."""
        uniq, inv = np.unique(keys, return_inverse=True)
        ids = self._node_of.get(uniq).astype(np.int64)
        need = np.zeros(len(uniq), bool)
        need[inv[create]] = True
        new = need & (ids < 0)
        if new.any():
            ids[new] = self._new_nodes(uniq[new])
        return ids[inv]

    def _learn_parents(self, child: np.ndarray, parent: np.ndarray) -> None:
        """A node whose parent is unknown learns it (chained hashes: every event
        agrees on a block's parent)."""
        learn = self._parent[child] == UNKNOWN
        self._parent[child[learn]] = parent[learn]

    def _link(self, hashes: np.ndarray, parents: np.ndarray, has_parent: np.ndarray) -> None:
        """Nodes for every block and named parent, parents learned."""
        ids = self._node_ids(np.concatenate([hashes, parents[has_parent]]), np.ones(len(hashes) + int(has_parent.sum()), bool))
        parent = np.full(len(hashes), ROOT, np.int64)
        parent[has_parent] = ids[len(hashes):]
        self._learn_parents(ids[: len(hashes)], parent)

    def _new_nodes(self, keys: np.ndarray) -> np.ndarray:
        """New placeholder nodes (parent UNKNOWN, nobody holding) for unique keys not
        in the index; their ids."""
        reuse = self._free[: len(keys)]
        self._free = self._free[len(reuse):]
        fresh = np.arange(self._hw, self._hw + len(keys) - len(reuse))
        self._hw += len(fresh)
        if self._hw > len(self._parent):
            self._grow_nodes(self._hw)
        ids = np.concatenate([reuse, fresh])
        self._parent[ids] = UNKNOWN
        self._node_of.put(keys, ids.astype(np.int32))
        return ids

    def _grow_nodes(self, need: int) -> None:
        cap = max(need, len(self._parent) * 3 // 2)
        parent = np.full(cap, FREE, np.int32)
        parent[: len(self._parent)] = self._parent
        bits = np.zeros((cap, self._bits.shape[1]), np.uint64)
        bits[: len(self._bits)] = self._bits
        self._parent, self._bits = parent, bits

    def _add_keys(self, keys: np.ndarray, stamps: np.ndarray) -> None:
        """Entries (unique keys; nodes exist) held from now on, touched at ``stamps``."""
        if not keys.size:
            return
        nodes, wids = _split_keys(keys)
        np.bitwise_or.at(self._bits, (nodes, wids >> 6), np.uint64(1) << (wids & 63).astype(np.uint64))
        new = self._entries.put(keys, stamps)
        self._counts += np.bincount(wids[new], minlength=len(self._counts))

    def _drop_keys(self, keys: np.ndarray) -> None:
        """Entries (unique keys) no longer held; keys not held are skipped."""
        if not keys.size:
            return
        slots = self._entries.find(keys)
        keys, slots = keys[slots >= 0], slots[slots >= 0]
        if not keys.size:
            return
        nodes, wids = _split_keys(keys)
        np.bitwise_and.at(self._bits, (nodes, wids >> 6), ~(np.uint64(1) << (wids & 63).astype(np.uint64)))
        self._entries.delete_slots(slots)
        self._counts -= np.bincount(wids, minlength=len(self._counts))
        self._removed_since_collect += len(keys)
        if self._removed_since_collect > max(_MIN_COLLECT, (self._hw - len(self._free)) // 4):
            self._collect()

    def _touch_matches(self, nodes: np.ndarray, counts: dict[str, int]) -> None:
        """Each matching worker's leading entries become most recent, tail first
        (workers in name order), as if moved to the end of one LRU list."""
        matched = [(self._workers[w].wid, c) for w, c in counts.items() if c]
        if not matched:
            return
        wids = np.array([w for w, _ in matched])
        cs = np.array([c for _, c in matched])
        total = int(cs.sum())
        within = np.arange(total) - np.repeat(np.cumsum(cs) - cs, cs)
        block = np.repeat(cs, cs) - 1 - within  # tail first
        slots = self._entries.find(_entry_keys(nodes[block].astype(np.int64), np.repeat(wids, cs)))
        self._entries.set_at(slots, self._clock + np.arange(total))
        self._clock += total

    # ---- internals: the cap and reclaiming nodes --------------------------------------

    def _enforce_cap(self) -> None:
        excess = len(self._entries) - self.max_blocks
        while excess > 0:
            if not self._queue_keys.size:
                self._refill_queue(excess)
            chunk = min(len(self._queue_keys), excess * 2 + 64)
            keys, stamps = self._queue_keys[:chunk], self._queue_stamps[:chunk]
            valid = np.flatnonzero(self._entries.get(keys) == stamps)[:excess]
            used = int(valid[-1]) + 1 if len(valid) == excess else chunk
            self._queue_keys, self._queue_stamps = self._queue_keys[used:], self._queue_stamps[used:]
            victims = keys[valid]
            self._drop_keys(victims)
            self.evictions += len(victims)
            excess -= len(victims)

    def _refill_queue(self, excess: int) -> None:
        """The oldest entries, oldest first. Entries outside the queue are newer than
        every entry in it whose stamp is unchanged, so the first still-valid entry
        of the queue is always the least recently used of the whole index."""
        keys, stamps = self._entries.items()
        k = min(len(keys), max(excess, self.max_blocks // 16, 1))
        part = np.argpartition(stamps, k - 1)[:k] if k < len(keys) else np.arange(len(keys))
        order = part[np.argsort(stamps[part], kind="stable")]
        self._queue_keys, self._queue_stamps = keys[order], stamps[order]

    def _collect(self) -> None:
        """Reclaim every node that neither holds a block nor leads to one: mark the
        held nodes, then their ancestors by pointer doubling (about log2(depth)
        passes), and free the rest."""
        if not self._removed_since_collect:
            return
        self._removed_since_collect = 0
        hw = self._hw
        parent = self._parent[:hw]
        sink = hw  # where chains end (root, unknown parent)
        jump = np.append(np.where(parent >= 0, parent, sink), sink).astype(np.int64)  # [hw + 1]
        live = np.append(self._bits[:hw].any(axis=1), False)  # [hw + 1]
        count = int(live.sum())
        # live holds every ancestor closer than 2^k; jump = parent^(2^k). If a pass
        # adds nothing, live is closed under parent^(2^k) too, hence under all of them.
        while True:
            live[jump[live]] = True
            live[sink] = False
            count, before = int(live.sum()), count
            if count == before:
                break
            jump = jump[jump]
        dead = np.flatnonzero((parent != FREE) & ~live[:hw])
        if dead.size:
            keys, ids = self._node_of.items()
            is_dead = np.zeros(hw, bool)
            is_dead[dead] = True
            self._node_of.delete(keys[is_dead[ids]])
            self._parent[dead] = FREE
            in_use = np.flatnonzero(self._parent[:hw] != FREE)
            self._hw = int(in_use[-1]) + 1 if in_use.size else 0
            self._free = np.flatnonzero(self._parent[: self._hw] == FREE)


def _entry_keys(nodes: np.ndarray, wids) -> np.ndarray:
    return (nodes.astype(np.uint64) << np.uint64(_WID_BITS)) | np.asarray(wids, dtype=np.uint64)


def _split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry keys -> (node ids, worker ids), both int64."""
    return (keys >> np.uint64(_WID_BITS)).astype(np.int64), (keys & np.uint64((1 << _WID_BITS) - 1)).astype(np.int64)


def _last_occurrence(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys and the position of each one's last occurrence."""
    uniq, first_rev = np.unique(keys[::-1], return_index=True)
    return uniq, len(keys) - 1 - first_rev


def _depths(pairs: Sequence[tuple[BlockHash, BlockHash | None]]) -> dict[BlockHash, int]:
    """Depth of each block within a snapshot (a block whose parent is not in the
    snapshot counts as depth 0)."""
    parent_of = dict(pairs)
    depth: dict[BlockHash, int] = {}
    for h in parent_of:
        path = []
        cur: BlockHash | None = h
        while cur is not None and cur in parent_of and cur not in depth:
            path.append(cur)
            cur = parent_of[cur]
            if len(path) > len(parent_of):  # a cycle can only come from a corrupt snapshot
                raise ValueError("KV snapshot parent links form a cycle")
        base = depth[cur] + 1 if cur is not None and cur in depth else 0
        for i, b in enumerate(reversed(path)):
            depth[b] = base + i
    return depth
