"""A compact hash table from uint64 keys to non-negative int64 values, operated on in
batches with numpy: the storage behind the residency index.

Open addressing with linear probing over two flat arrays, so an entry costs its slot
(8-byte key + 4- or 8-byte value) divided by the load factor, instead of the ~150
bytes of a Python dict entry with boxed int keys and values::

    keys   [cap] uint64     the key in each slot
    vals   [cap] int32|int64  >= 0: the value; EMPTY (-1) or TOMB (-2, deleted)

A key's home slot is a multiplicative (Fibonacci) hash of the key, so structured keys
(small integers packed together) spread as well as random block hashes. Every
operation takes a batch of keys and probes all of them at once, one vectorised round
per probe step; a batch pays the Python overhead once, not once per key.

Deleting leaves a tombstone (a probe continues past it); the table is rebuilt when
live + tombstones pass ``max_load`` of the capacity (doubling only if the live keys
alone need it).
"""

from __future__ import annotations

import numpy as np

EMPTY = -1
TOMB = -2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SCALAR_TAIL = 16  # keys left when find switches from vectorised rounds to a plain loop


class U64Table:
    def __init__(self, value_dtype: type = np.int64, capacity: int = 1024, max_load: float = 0.7) -> None:
        if not 0.1 <= max_load <= 0.9:
            raise ValueError(f"max_load must be in [0.1, 0.9], got {max_load}")
        self.value_dtype = np.dtype(value_dtype)
        self.max_load = max_load
        self._alloc(max(16, 1 << int(capacity - 1).bit_length()))
        self.size = 0  # live keys
        self._tombs = 0

    def _alloc(self, cap: int) -> None:
        self.cap = cap
        self._shift = np.uint64(64 - (cap.bit_length() - 1))
        self._mask = cap - 1
        self.keys = np.zeros(cap, np.uint64)
        self.vals = np.full(cap, EMPTY, self.value_dtype)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _GOLDEN) >> self._shift).astype(np.int64)

    # ---- queries ----------------------------------------------------------------------

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, or -1 where absent.  keys: [n] uint64 -> [n] int64."""
        n = len(keys)
        out = np.full(n, -1, np.int64)
        if n == 0 or self.size == 0:
            return out
        pos = self._home(keys)
        todo = np.arange(n)
        while todo.size > _SCALAR_TAIL:
            p = pos[todo]
            v = self.vals[p]
            hit = (v >= 0) & (self.keys[p] == keys[todo])
            out[todo[hit]] = p[hit]
            go_on = ~hit & (v != EMPTY)
            todo = todo[go_on]
            pos[todo] = (p[go_on] + 1) & self._mask
        # The last few keys may sit at the end of long probe runs: one vectorised
        # round each costs more than walking them one by one.
        vals, tkeys, mask = self.vals, self.keys, self._mask
        for i in todo.tolist():
            p, k = int(pos[i]), keys[i]
            while True:
                v = vals[p]
                if v == EMPTY:
                    break
                if v >= 0 and tkeys[p] == k:
                    out[i] = p
                    break
                p = (p + 1) & mask
        return out

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Value of each key, or -1 where absent.  [n] uint64 -> [n] value dtype."""
        slots = self.find(keys)
        out = np.full(len(keys), -1, self.value_dtype)
        found = slots >= 0
        out[found] = self.vals[slots[found]]
        return out

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (key, value), in slot order."""
        live = self.vals >= 0
        return self.keys[live], self.vals[live]

    # ---- updates ----------------------------------------------------------------------

    def put(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Insert or overwrite; ``keys`` must be unique within the batch. Returns
        which keys were new ([n] bool)."""
        if len(keys) == 0:
            return np.zeros(0, bool)
        slots = self.find(keys)
        old = slots >= 0
        self.vals[slots[old]] = values[old]
        new_keys, new_vals = keys[~old], values[~old]
        if len(new_keys):
            self._reserve(len(new_keys))
            self._insert_absent(new_keys, new_vals)
        return ~old

    def set_at(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Overwrite values at slots returned by ``find`` (all >= 0)."""
        self.vals[slots] = values

    def delete(self, keys: np.ndarray) -> int:
        """Remove the keys present (unique within the batch); returns how many were."""
        slots = self.find(keys)
        return self.delete_slots(slots[slots >= 0])

    def delete_slots(self, slots: np.ndarray) -> int:
        """Remove the keys at slots returned by ``find`` (unique, all >= 0)."""
        self.vals[slots] = TOMB
        self.size -= len(slots)
        self._tombs += len(slots)
        return len(slots)

    def _reserve(self, extra: int) -> None:
        if self.size + self._tombs + extra <= self.max_load * self.cap:
            return
        cap = self.cap
        while (self.size + extra) > self.max_load * cap * 0.75:  # leave room after a rebuild
            cap *= 2
        keys, vals = self.items()
        self._alloc(cap)
        self.size, self._tombs = 0, 0
        self._insert_absent(keys, vals)

    def _insert_absent(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Keys known absent (and unique): claim the first free slot of each probe
        sequence; keys that race for one slot in the same round retry one further."""
        pos = self._home(keys)
        todo = np.arange(len(keys))
        while todo.size:
            p = pos[todo]
            v = self.vals[p]
            free = v < 0
            cand, cand_p = todo[free], p[free]
            self._tombs -= int(np.count_nonzero(v[free] == TOMB))  # counted once per slot below
            # One winner per slot, without sorting: every candidate writes its mark
            # (-3 - index) into its slot, one of them stays; that one takes the slot.
            self.vals[cand_p] = -3 - cand
            won_mask = self.vals[cand_p] == -3 - cand
            won, wp = cand[won_mask], cand_p[won_mask]
            # a slot claimed by several candidates was counted once per candidate
            self._tombs += int(np.count_nonzero(v[free][~won_mask] == TOMB))
            self.keys[wp] = keys[won]
            self.vals[wp] = values[won]
            lost = np.ones(len(todo), bool)
            lost[np.flatnonzero(free)[won_mask]] = False
            todo = todo[lost]
            pos[todo] = (pos[todo] + 1) & self._mask
        self.size += len(keys)
