"""KV transfer bandwidth: the UCX transport between two Ray actors vs a local memcpy.

    python -m bench.transfer                 # CPU: writes bench/results/transfer.{md,json,png}
    python -m bench.transfer --device cuda   # GPU: two actors sharing one GPU -> transfer.cuda.*
    python -m bench.transfer --quick         # smoke run (small sizes, prints only)

What is measured, for 16, 64 and 256 MiB of KV (SmolLM2-135M's shape: 30 layers,
3 KV heads x 64 head_dim, K and V in float32 = 1536 bytes per token per layer; token
counts are rounded to whole 64-token pages, so the sizes are within 6 % of nominal):

  paged/16, paged/64  End to end, as the KV protocol moves a prompt's pages. Each side
                      holds a paged cache, per layer [num_blocks, 2, page_tokens, 3, 64]
                      float32, and the prompt's pages sit at scattered block ids (a random
                      subset, different on the two sides). The sender gathers one layer's
                      pages into a contiguous buffer (index_select) and sends it, layer by
                      layer, without waiting; the receiver has posted one recv per layer
                      and scatters each layer into its cache (index_copy_) as it lands.
                      Time: from the sender's first gather to the receiver's last scatter
                      (CLOCK_MONOTONIC is shared by processes on one machine).
  raw                 The same number of bytes as one contiguous buffer, one message.
  memcpy              torch copy_ between two preallocated tensors of the same size in one
                      process: the local ceiling. UCX/memcpy is the ratio reported.

GB/s is 10^9 bytes per second. Every cell is measured --repeats times after a warm-up,
and the median is reported (all runs are in the JSON). Both actors and the memcpy use
one torch thread. On CPU the two actors share the machine's cores with UCX's progress
threads and anything else running, so the numbers are noisy; see the load average.

GPU mode (--device cuda): the caches, gathers, scatters and buffers are on the GPU; each
actor gets half of the one GPU, so UCX moves device memory between processes (cuda_ipc),
never staged through host. The ceiling is a device-to-device copy_ on that GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import torch  # noqa: E402
from bench.report import cpu_name, loadavg, pyplot, reading_section

# SmolLM2-135M's KV: 30 layers, 3 KV heads, head_dim 64; float32 here.
NUM_LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
DTYPE = torch.float32
BYTES_PER_TOKEN_LAYER = 2 * KV_HEADS * HEAD_DIM * 4  # 1536
TIMEOUT_S = 120.0
MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    mode: str  # "paged" | "raw"
    size_mib: int  # nominal
    page_tokens: int  # 0 for raw

    @property
    def tokens(self) -> int:
        """Tokens of KV, a whole number of 64-token pages, so both page sizes move the same bytes."""
        return max(1, round(self.size_mib * MiB / (BYTES_PER_TOKEN_LAYER * NUM_LAYERS) / 64)) * 64

    @property
    def nbytes(self) -> int:
        return self.tokens * BYTES_PER_TOKEN_LAYER * NUM_LAYERS

    @property
    def pages(self) -> int:  # per layer
        return self.tokens // self.page_tokens

    @property
    def label(self) -> str:
        return f"paged/{self.page_tokens}" if self.mode == "paged" else "raw"


class Peer:
    """One side of the transfer, in its own Ray actor (also the memcpy baseline)."""

    def __init__(self, device: str) -> None:
        from cluster.transport import make_transport

        torch.set_num_threads(1)
        self.device = torch.device(device)
        self.transport = make_transport("ucx")
        self.pending: list = []
        self.waiter: threading.Thread | None = None
        self.done_at = 0.0

    def address(self) -> bytes:
        return self.transport.address

    def setup(self, case: Case, seed: int) -> None:
        """Allocate this side's cache and buffers for ``case``; fill them from ``seed``."""
        self.case = case
        self.cache = self.staging = self.flat = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        g = torch.Generator().manual_seed(seed)
        if case.mode == "raw":
            self.flat = torch.randint(0, 256, (case.nbytes,), dtype=torch.uint8, generator=g).to(self.device)
            return
        num_blocks = 2 * case.pages + 1  # the prompt's pages scattered among as many others
        page = (2, case.page_tokens, KV_HEADS, HEAD_DIM)
        self.cache = torch.randn((NUM_LAYERS, num_blocks, *page), dtype=DTYPE, generator=g).to(self.device)
        # [pages] int64: where this side keeps the prompt's pages, in prompt order
        self.block_ids = torch.randperm(num_blocks, generator=g)[: case.pages].to(self.device)
        self.staging = torch.empty((NUM_LAYERS, case.pages, *page), dtype=DTYPE, device=self.device)

    def send(self, peer: bytes, iteration: int) -> float:
        """Gather and send every layer; returns the start time once all sends completed."""
        start = time.monotonic()
        if self.case.mode == "raw":
            futures = [self.transport.send(peer, _tag(iteration, 0), self.flat, TIMEOUT_S)]
        else:
            futures = []
            for layer in range(NUM_LAYERS):
                torch.index_select(self.cache[layer], 0, self.block_ids, out=self.staging[layer])
                futures.append(self.transport.send(peer, _tag(iteration, layer), self.staging[layer], TIMEOUT_S))
        for f in futures:
            f.result()
        return start

    def post(self, iteration: int) -> None:
        """Post every recv now; a thread scatters each layer as it lands."""
        if self.case.mode == "raw":
            self.pending = [self.transport.recv(_tag(iteration, 0), self.flat, TIMEOUT_S)]
        else:
            self.pending = [self.transport.recv(_tag(iteration, layer), self.staging[layer], TIMEOUT_S)
                            for layer in range(NUM_LAYERS)]
        self.waiter = threading.Thread(target=self._drain, daemon=True)
        self.waiter.start()

    def _drain(self) -> None:
        for layer, f in enumerate(self.pending):
            f.result()
            if self.case.mode == "paged":
                self.cache[layer].index_copy_(0, self.block_ids, self.staging[layer])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.done_at = time.monotonic()

    def finish(self) -> float:
        self.waiter.join()
        for f in self.pending:
            f.result()  # re-raise a failed transfer here
        return self.done_at

    def digest(self) -> str:
        """SHA-256 of the prompt's KV as this side holds it (its pages, in prompt order)."""
        data = self.flat if self.case.mode == "raw" else self.cache[:, self.block_ids]
        return hashlib.sha256(data.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()

    def memcpy(self, nbytes: int, repeats: int) -> list[float]:
        """Seconds per copy_ of ``nbytes`` between two preallocated tensors (first run is a warm-up)."""
        src = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        times = []
        for _ in range(repeats + 1):
            self._sync()
            start = time.perf_counter()
            dst.copy_(src)
            self._sync()
            times.append(time.perf_counter() - start)
        del src, dst
        return times[1:]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.transport.close()


def _tag(iteration: int, layer: int) -> int:
    return iteration << 16 | layer


def measure(sender, receiver, receiver_addr: bytes, case: Case, repeats: int, iteration: list[int]) -> list[float]:
    import ray

    ray.get([sender.setup.remote(case, seed=1), receiver.setup.remote(case, seed=2)])
    seconds = []
    for run in range(repeats + 1):  # run 0 is a warm-up (endpoint creation, first touch)
        iteration[0] += 1
        ray.get(receiver.post.remote(iteration[0]))
        start = ray.get(sender.send.remote(receiver_addr, iteration[0]))
        done = ray.get(receiver.finish.remote())
        if run:
            seconds.append(done - start)
    sent, got = ray.get([sender.digest.remote(), receiver.digest.remote()])
    if sent != got:
        raise AssertionError(f"{case}: the receiver's KV differs from the sender's")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes-mib", type=int, nargs="+", default=None, help="default 16 64 256 (--quick: 4 16)")
    p.add_argument("--page-tokens", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 5; --quick 2)")
    p.add_argument("--quick", action="store_true", help="small sizes, prints only (unless --out)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/transfer[.cuda])")
    args = p.parse_args(argv)
    sizes = args.sizes_mib or ([4, 16] if args.quick else [16, 64, 256])
    repeats = args.repeats or (2 if args.quick else 5)
    out = args.out or (None if args.quick else "bench/results/transfer" + (".cuda" if args.device == "cuda" else ""))

    import ray

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a GPU")
    load_before = loadavg()
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
             runtime_env={"env_vars": {"UCX_WARN_UNUSED_ENV_VARS": "n"}})
    try:
        gpus = 0.5 if args.device == "cuda" else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(Peer)
        sender, receiver = actor.remote(args.device), actor.remote(args.device)
        receiver_addr = ray.get(receiver.address.remote())
        results, iteration = [], [0]
        for size in sizes:
            nbytes = Case("raw", size, 0).nbytes
            copy_s = ray.get(sender.memcpy.remote(nbytes, repeats))
            results.append(_row("memcpy", size, nbytes, copy_s, None))
            cases = [Case("raw", size, 0)] + [Case("paged", size, pt) for pt in args.page_tokens]
            for case in cases:
                seconds = measure(sender, receiver, receiver_addr, case, repeats, iteration)
                results.append(_row(case.label, size, case.nbytes, seconds, statistics.median(copy_s)))
                r = results[-1]
                print(f"{size:>4} MiB {r['what']:>9}: {r['gbps']:6.2f} GB/s  ({r['ratio']:.2f}x memcpy)", flush=True)
        ray.get([sender.close.remote(), receiver.close.remote()])
    finally:
        ray.shutdown()
    meta = _meta(args, argv, sizes, repeats, load_before, time.monotonic() - t0)
    for r in results:
        if r["what"] == "memcpy":
            print(f"{r['size_mib']:>4} MiB    memcpy: {r['gbps']:6.2f} GB/s")
    if out:
        _write(Path(out), meta, results)
    return 0


def _row(what: str, size_mib: int, nbytes: int, seconds: list[float], memcpy_s: float | None) -> dict:
    median = statistics.median(seconds)
    return {
        "what": what, "size_mib": size_mib, "bytes": nbytes, "seconds": [round(s, 6) for s in seconds],
        "median_s": round(median, 6), "gbps": round(nbytes / median / 1e9, 3),
        "best_gbps": round(nbytes / min(seconds) / 1e9, 3),
        "ratio": None if memcpy_s is None else round(memcpy_s / median, 3),
    }


def _meta(args, argv, sizes, repeats, load_before, total_s) -> dict:
    import ray
    import ucxx

    return {
        "device": args.device,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.transfer", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "machine": cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(0),
        "cpu_count": os.cpu_count(),
        "torch_threads_per_actor": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "ucxx": ucxx.__version__,
        "ucx": ucxx.__ucx_version__,
        "ucx_tls": os.environ.get("UCX_TLS", "(UCX default: all it finds)"),
        "kv": {"layers": NUM_LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
               "bytes_per_token_per_layer": BYTES_PER_TOKEN_LAYER},
        "sizes_mib": sizes,
        "page_tokens": args.page_tokens,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "total_seconds": round(total_s, 1),
    }


def _write(stem: Path, meta: dict, results: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    m = meta
    where = "two Ray actors sharing one GPU (device memory)" if m["device"] == "cuda" else "two Ray actors on one host"
    md = [
        f"# KV transfer: UCX between {where} vs local memcpy",
        "",
        f"Reproduce: `{m['command']}`",
        "",
        f"Machine: {m['machine']}, {m['cpu_count']} CPU cores; one torch thread per actor. "
        f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, ucxx {m['ucxx']} (UCX {m['ucx']}), "
        f"UCX_TLS {m['ucx_tls']}. {m['date']}; load average before/after: "
        f"{m['loadavg_before']} / {m['loadavg_after']}; whole run {m['total_seconds']} s.",
        "",
        f"KV of SmolLM2-135M ({m['kv']['layers']} layers x {m['kv']['kv_heads']} KV heads x "
        f"{m['kv']['head_dim']} head_dim, K+V float32 = {m['kv']['bytes_per_token_per_layer']} B per token "
        "per layer). paged/N: the sender gathers N-token pages from scattered blocks of its paged cache "
        "into one buffer per layer and sends the 30 layers back to back; the receiver scatters each "
        "layer into its own cache as it lands; timed from the first gather to the last scatter. raw: "
        "the same bytes as one contiguous message. memcpy: torch copy_ of the same bytes in one process. "
        f"GB/s = 10^9 B/s, median of {m['repeats']} runs after a warm-up; the best run (the least disturbed "
        "by other processes) beside it; every run is in the JSON.",
        "",
        "| KV | what | median s | GB/s | UCX / memcpy | best run GB/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        md.append(f"| {r['bytes'] / MiB:.1f} MiB | {r['what']} | {r['median_s']:.4f} | {r['gbps']:.2f} | {ratio} "
                  f"| {r['best_gbps']:.2f} |")
    if m["device"] == "cpu":
        md += [
            "",
            "Noise: this machine is shared with other jobs (see the load average above), and the two "
            "actors, UCX's progress threads and ucxx's notifier threads contend for "
            f"{m['cpu_count']} cores: expect run-to-run swings; the per-run times are in the JSON."
            + (" A UCX / memcpy ratio above 1 only means the memcpy runs were disturbed more."
               if any((r["ratio"] or 0) > 1 for r in results) else ""),
            "",
            "Path (seen with UCX_PROTO_INFO=y when this bench was written): messages up to 8 KiB go "
            "eager through sysv shared memory, larger ones by rendezvous with a zero-copy CMA read "
            "(process_vm_readv) by the receiver. With `UcxTransport(error_handling=True)` UCX may "
            "only use transports that detect peer failure, i.e. TCP loopback, several times slower.",
        ]
    md += [
        "",
        f"![bandwidth]({stem.name}.png)",
        "",
        *reading_section(stem.with_name(stem.name + ".md")),
    ]
    stem.with_name(stem.name + ".md").write_text("\n".join(md))
    _plot(stem.with_name(stem.name + ".png"), meta, results)
    print(f"wrote {stem}.{{md,json,png}}")


def _plot(path: Path, meta: dict, results: list[dict]) -> None:
    plt = pyplot()

    sizes = meta["sizes_mib"]
    kinds = ["memcpy", "raw"] + [f"paged/{pt}" for pt in meta["page_tokens"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        gbps = [next(r["gbps"] for r in results if r["what"] == kind and r["size_mib"] == s) for s in sizes]
        bars = ax.bar([x + (i - (len(kinds) - 1) / 2) * width for x in range(len(sizes))], gbps, width,
                      label=kind if kind == "memcpy" else f"UCX {kind}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    actual = [next(r["bytes"] for r in results if r["size_mib"] == s) / MiB for s in sizes]
    ax.set_xticks(range(len(sizes)), [f"{a:.1f} MiB of KV" for a in actual])
    ax.set_ylabel("GB/s (median)")
    ax.set_title(f"KV transfer between two Ray actors ({meta['device']}) vs memcpy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)






if __name__ == "__main__":
    sys.exit(main())
