"""router/u64_table.py against a dict: random batches of puts, overwrites and deletes
(tombstones, rebuilds and growth included), and keys that collide on purpose."""

from __future__ import annotations

import random

import numpy as np

from router.u64_table import U64Table


def test_matches_a_dict_through_growth_and_tombstones():
    rng = random.Random(0)
    table, truth = U64Table(np.int64, capacity=16), {}
    for step in range(300):
        keys = list({rng.getrandbits(64) if rng.random() < 0.7 else rng.choice(list(truth) or [1]) for _ in range(rng.randrange(1, 200))})
        if rng.random() < 0.65:
            vals = [rng.randrange(1 << 40) for _ in keys]
            new = table.put(np.array(keys, np.uint64), np.array(vals, np.int64))
            assert new.tolist() == [k not in truth for k in keys]
            truth.update(zip(keys, vals))
        else:
            gone = table.delete(np.array(keys, np.uint64))
            assert gone == sum(k in truth for k in keys)
            for k in keys:
                truth.pop(k, None)
        probe = keys + [rng.getrandbits(64) for _ in range(20)]
        assert table.get(np.array(probe, np.uint64)).tolist() == [truth.get(k, -1) for k in probe]
        assert len(table) == len(truth)
    live_keys, live_vals = table.items()
    assert dict(zip(live_keys.tolist(), live_vals.tolist())) == truth
    assert table.size + table._tombs <= table.max_load * table.cap


def test_keys_with_one_home_slot_probe_past_each_other():
    table = U64Table(np.int32, capacity=64)
    # multiples of 2**58 all land on a handful of home slots of a 64-slot table
    keys = np.array([i << 58 for i in range(1, 40)], np.uint64)
    table.put(keys, np.arange(39, dtype=np.int32))
    assert table.get(keys).tolist() == list(range(39))
    table.delete(keys[::2])
    assert table.get(keys).tolist() == [-1 if i % 2 == 0 else i for i in range(39)]
    table.put(keys[::2], np.arange(100, 120, dtype=np.int32))  # into the tombstones
    assert table.get(keys[::2]).tolist() == list(range(100, 120))
