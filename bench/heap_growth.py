"""Where a worker's resident memory goes under load: an in-process prefill + decode pair
(the real SmolLM2, the UCX transport, the soak's engine settings) serving closed-loop
multi-turn chat requests, with the process's RSS sampled as they run, then three
questions answered at the end:

- does a Python structure grow? (gc objects by type, and with ``--tracemalloc`` the
  allocation sites that grew, between the warm-up and the end);
- is the growth memory glibc holds free? (RSS before and after one ``malloc_trim(0)``);
- how long does a trim take?

    python -m bench.heap_growth --requests 160                 # the workers' own trimmer off
    python -m bench.heap_growth --requests 160 --heap-trim-s 30
    MALLOC_ARENA_MAX=2 python -m bench.heap_growth --requests 160
    python -m bench.heap_growth --requests 120 --linear-kernel torch  # the model's linears without oneDNN
    python -m bench.heap_growth --linear-rows 200   # the linear layers alone, per kernel

Prints its readings; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ctypes.util
import gc
import os
import random
import threading
import time
import tracemalloc

import numpy as np
import torch


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo2() -> dict[str, float] | None:
    """glibc's heap counters (all arenas), MiB: in use (``uordblks``), free inside the
    arenas (``fordblks``), mmapped chunks (``hblkhd``). None outside glibc >= 2.33."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {"in_use": m.uordblks / 2**20, "free": m.fordblks / 2**20, "mmapped": m.hblkhd / 2**20}


def receivers() -> tuple[int, float]:
    """KVReceiver objects alive or awaiting the cyclic gc, and the MiB their buffers hold."""
    n, nbytes = 0, 0
    for o in gc.get_objects():
        if type(o).__name__ == "KVReceiver":
            n += 1
            nbytes += sum(t.numel() * t.element_size() for t in o.layers)
    return n, nbytes / 2**20


def garbage() -> tuple[collections.Counter, float]:
    """What the cyclic gc would free now: objects by type, and the MiB of tensor and
    array memory among them (memory refcounting alone never gives back)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    gc.set_debug(0)
    found, gc.garbage[:] = list(gc.garbage), []
    nbytes = 0
    for o in found:
        if isinstance(o, torch.Tensor) and o._base is None:
            nbytes += o.untyped_storage().nbytes()
        elif isinstance(o, np.ndarray) and o.base is None:
            nbytes += o.nbytes
    return collections.Counter(type(o).__name__ for o in found), nbytes / 2**20


def live_tensors() -> tuple[int, float]:
    """Tensors Python can reach (or has not collected yet) and the MiB of their storages,
    each storage once: what Python holds, against what glibc says is in use."""
    seen: set[int] = set()
    n, nbytes = 0, 0
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            n += 1
            st = o.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                nbytes += st.nbytes()
    return n, nbytes / 2**20


def object_types() -> collections.Counter:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def linear_rows(kernel: str, rows: int) -> None:
    """The linear layers alone (SmolLM2's four weight shapes, random weights, one thread),
    each called at ``rows`` row counts never seen before, then at the same ones again:
    what a new row count costs in memory that stays (after a trim), per kernel. A
    prefill worker sees a new row count with every new chunk length; a decode worker
    sees only its batch sizes."""
    from cluster import heap_trim
    from workers.model.packed_linear import PackedLinear

    torch.set_num_threads(1)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down
    layers = [torch.nn.Linear(i, o, bias=False) for o, i in shapes]
    if kernel == "onednn":
        layers = [PackedLinear(lin.weight, None) for lin in layers]

    def sweep(first: int, n: int) -> None:
        with torch.no_grad():
            for m in range(first, first + n):
                for lin in layers:
                    lin(torch.randn(m, lin.in_features))

    sweep(1, 1)  # warm-up: one row
    heap_trim.trim_now()
    rss0, m0 = rss_mib(), mallinfo2() or {}
    sweep(2, rows)  # row counts 2 .. rows + 1, each new
    heap_trim.trim_now()
    rss1, m1 = rss_mib(), mallinfo2() or {}
    sweep(2, rows)  # the same again
    heap_trim.trim_now()
    rss2 = rss_mib()
    print(f"{kernel}: {rows} new row counts x {len(shapes)} weight shapes: RSS {rss1 - rss0:+.1f} MiB after a trim "
          f"(malloc in use {m1.get('in_use', 0) - m0.get('in_use', 0):+.1f}); the same row counts again: "
          f"{rss2 - rss1:+.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--heap-trim-s", type=float, default=0.0, help="the workers' periodic trim (0: off)")
    ap.add_argument("--transport", default="ucx", choices=["ucx", "inprocess"])
    ap.add_argument("--linear-kernel", default="auto", choices=["auto", "torch", "onednn"])
    ap.add_argument("--tracemalloc", action="store_true", help="allocation sites that grew (slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--linear-rows", type=int, default=0,
                    help="instead: the linear layers alone at this many new row counts, per kernel (no model)")
    args = ap.parse_args()
    if args.linear_rows:
        for kernel in ("torch", "onednn"):
            linear_rows(kernel, args.linear_rows)
        return

    from cluster.cluster import KVRelayCluster
    from cluster.config import ClusterConfig
    from cluster import heap_trim
    from workers.sampling_params import SamplingParams

    cfg = ClusterConfig.build({"engine": {"max_model_len": 4096, "linear_kernel": args.linear_kernel}, "transfer": {"transport": args.transport},
                               "pools": {"heap_trim_s": args.heap_trim_s}})
    cluster = KVRelayCluster(cfg, use_ray=False)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro, timeout: float = 3600.0):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    run(cluster.start())
    rng = random.Random(args.seed)
    done = [0]
    samples: list[tuple[int, float]] = []

    async def session() -> None:
        conv: list[list[int]] = []
        while done[0] < args.requests:
            if not conv or len(conv) > 7:  # 4 turns (question + answer each), then a new conversation
                conv = [[rng.randint(100, 40000) for _ in range(rng.randint(60, 240))]]
            else:
                conv.append([rng.randint(100, 40000) for _ in range(12)])
            temp = rng.choice([0.0, 0.0, 0.7])
            params = SamplingParams(max_tokens=32, temperature=temp, seed=rng.randint(0, 10**6) if temp else None)
            out: list[int] = []
            async for o in cluster.generate([t for part in conv for t in part], params):
                out += o.new_token_ids
            conv.append(out)
            done[0] += 1
            if done[0] % 20 == 0:
                samples.append((done[0], rss_mib()))
                n, mib = receivers()
                nt, tmib = live_tensors()
                m = mallinfo2() or {}
                print(f"{done[0]} requests: RSS {samples[-1][1]:.1f} MiB, malloc in use {m.get('in_use', 0):.1f} MiB, "
                      f"free in arenas {m.get('free', 0):.1f}, mmapped {m.get('mmapped', 0):.1f}; KVReceivers {n} "
                      f"holding {mib:.1f} MiB; tensors {nt} holding {tmib:.1f} MiB; gc collections {[s['collections'] for s in gc.get_stats()]}", flush=True)

    gc.collect()
    heap_trim.trim_now()  # what loading left free in the heap is not the load's
    rss0, types0 = rss_mib(), object_types()
    if args.tracemalloc:
        tracemalloc.start(8)
        snap0 = tracemalloc.take_snapshot()
    print(f"after start-up: RSS {rss0:.1f} MiB", flush=True)
    t0 = time.monotonic()
    async def sessions() -> None:
        await asyncio.gather(*(session() for _ in range(args.concurrency)))

    run(sessions())
    wall = time.monotonic() - t0
    rss_pre, malloc_pre, (n, mib) = rss_mib(), mallinfo2(), receivers()
    types, tensors = garbage()
    print(f"cyclic garbage at the end of the load: {sum(types.values())} objects, {tensors:.1f} MiB of tensors and "
          f"arrays among them (KVReceivers {n}, holding {mib:.1f} MiB); most common: {types.most_common(12)}")
    print(f"malloc in use before/after collecting it: {malloc_pre and round(malloc_pre['in_use'], 1)} / "
          f"{mallinfo2() and round(mallinfo2()['in_use'], 1)} MiB")
    rss1, types1 = rss_mib(), object_types()
    print(f"after {done[0]} requests in {wall:.0f}s: RSS {rss1:.1f} MiB, growth {rss1 - rss0:+.1f} MiB")
    grown = sorted(((k, types1[k] - types0.get(k, 0)) for k in types1), key=lambda kv: -kv[1])[:10]
    print("gc objects grown, by type:", grown)
    if args.tracemalloc:
        snap1 = tracemalloc.take_snapshot()
        cur, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc: {cur / 2**20:.1f} MiB traced now, peak {peak / 2**20:.1f} MiB; top growth:")
        for st in snap1.compare_to(snap0, "lineno")[:8]:
            print("  ", st)
        tracemalloc.stop()
    t = time.perf_counter()
    trimmed = heap_trim.trim_now()
    ms = (time.perf_counter() - t) * 1e3
    rss2 = rss_mib()
    print(f"malloc_trim(0) {'took' if trimmed else 'unavailable'} {ms:.1f} ms: RSS {rss2:.1f} MiB "
          f"({rss2 - rss1:+.1f} MiB), growth left {rss2 - rss0:+.1f} MiB")
    os._exit(0)  # the in-process workers' threads need no orderly shutdown here


if __name__ == "__main__":
    main()
