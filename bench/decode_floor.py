"""The decode step against this machine's memory floor (CPU).

    python -m bench.decode_floor        # ~3 min; writes bench/results/decode_floor.md

A decode step must read every weight once and each sequence's KV once, so its floor is
(weight bytes + KV bytes read) / copy bandwidth. Measured here, in one process:

1. Copy bandwidth: ``dst.copy_(src)`` over 512 MiB, counting bytes read plus bytes
   written (as STREAM's copy does), and read bandwidth (``sum``) beside it.
2. Linear layers alone: SmolLM2's MLP shape (576 -> 1536), 300 distinct weight matrices
   (far beyond the caches), at M rows, through torch's ``F.linear`` (the reference) and
   through oneDNN on packed weights (``workers/model/packed_linear.py``, the CPU default).
3. The engine's decode step at batch 1, 8 and 32 (256-token prompts, greedy), on one
   torch thread, with the default kernels and with the torch reference kernels, median
   wall time of 12 steps after warm-up.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import machine_info, md_table, pyplot, reading_section
from workers.model.packed_linear import PackedLinear

OUT = Path("bench/results/decode_floor.md")


def copy_gbs() -> float:
    src, dst = torch.randn(128 * 2**20), torch.empty(128 * 2**20)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * src.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


def read_gbs() -> float:
    a = torch.randn(128 * 2**20)
    a.sum()
    t = time.perf_counter()
    for _ in range(5):
        a.sum()
    return a.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


def linear_gbs(dtype: torch.dtype, m: int, kernel: str) -> float:
    """Weight bytes read per second by a linear of M rows over 300 distinct matrices."""
    ws = [torch.randn(1536, 576).to(dtype) for _ in range(300)]
    if kernel == "onednn":
        mods = [PackedLinear(w, None) for w in ws]
        fns = [lambda x, mod=mod: mod(x) for mod in mods]
    else:
        fns = [lambda x, w=w: torch.nn.functional.linear(x, w) for w in ws]
    x = torch.randn(m, 576).to(dtype)
    with torch.inference_mode():
        for f in fns[:5]:
            f(x)
        t = time.perf_counter()
        for f in fns:
            f(x)
        dt = time.perf_counter() - t
    return sum(w.numel() * w.element_size() for w in ws) / dt / 1e9


def decode_steps(kernel: str, batch: int, prompt: int = 256, steps: int = 12) -> dict:
    """Median decode step of the engine at ``batch`` sequences, and the bytes it must read."""
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    # The default KV pool (1 GiB): the `cpu` backend's decode-context copies fit beside it, as in serving.
    eng = Engine(EngineConfig(dtype="float32", device="cpu", max_num_seqs=64,
                              enable_prefix_caching=False, num_threads=1, linear_kernel=kernel,
                              attention_backend="cpu" if kernel != "torch" else "torch"))
    rnd = random.Random(batch)
    params = SamplingParams(max_tokens=steps + 8, min_tokens=steps + 8, temperature=0.0)
    for i in range(batch):
        eng.add_request(f"r{i}", [rnd.randrange(100, 20000) for _ in range(prompt)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.requests.values()):
        eng.step()
    for _ in range(3):
        eng.step()
    ctx = [r.num_computed_tokens for r in eng.requests.values()]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    model, spec = eng.loaded.model, eng.kv_cache.spec
    weight_bytes = sum(m.in_features * m.out_features * 4 for m in model.modules()
                       if isinstance(m, (torch.nn.Linear, PackedLinear)))
    kv_bytes = sum(c + 1 + steps // 2 for c in ctx) * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    return {"step_ms": statistics.median(times) * 1e3, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.decode_floor", description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = p.parse_args(argv)

    lin_rows = []
    bw = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        bw[threads] = (copy_gbs(), read_gbs())
        for m in (1, 8, 32):
            cells = [threads, m, f"{bw[threads][0]:.1f}"]
            for dtype in (torch.float32, torch.bfloat16):
                for kernel in ("torch", "onednn"):
                    g = linear_gbs(dtype, m, kernel)
                    cells.append(f"{g:.1f} ({g / bw[threads][0]:.0%})")
            lin_rows.append(cells)
            print(cells, flush=True)

    torch.set_num_threads(1)
    copy1 = bw[1][0]
    step_rows, plot = [], {}
    for batch in args.batches:
        res = {k: decode_steps(k, batch) for k in ("auto", "torch")}
        floor_ms = (res["auto"]["weight_bytes"] + res["auto"]["kv_bytes"]) / (copy1 * 1e9) * 1e3
        a, t = res["auto"]["step_ms"], res["torch"]["step_ms"]
        step_rows.append([batch, f"{res['auto']['weight_bytes'] / 2**20:.0f}", f"{res['auto']['kv_bytes'] / 2**20:.1f}",
                          f"{floor_ms:.1f}", f"{t:.1f}", f"{floor_ms / t:.0%}", f"{a:.1f}", f"{floor_ms / a:.0%}",
                          f"{t / a:.2f}x", f"{batch / a * 1e3:.0f}"])
        plot[batch] = (floor_ms / t, floor_ms / a)
        print(step_rows[-1], flush=True)

    m = machine_info()
    lines = ["# The decode step against the memory floor (CPU)", "",
             "Reproduce: `python -m bench.decode_floor` (one process, one run; the module docstring says what "
             "each number is)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {m['cpu']}, {m['logical_cpus']} logical CPUs; "
             f"torch {m['torch']}; git {m['git_commit']}. Read bandwidth (sum): "
             f"{bw[1][1]:.1f} GB/s on 1 thread, {bw[2][1]:.1f} on 2.", "",
             "![decode floor](decode_floor.png)", "",
             "## Decode step (SmolLM2-135M float32, 1 torch thread, 256-token prompts)", "",
             "Floor = (weight bytes + KV bytes read) / copy bandwidth (1 thread). Default = the CPU defaults "
             "(oneDNN packed linear, `cpu` attention); reference = torch linear and `torch` attention.", ""]
    lines += md_table(["batch", "weights MiB", "KV read MiB", "floor ms", "reference ms", "of floor speed",
                       "default ms", "of floor speed", "default speed-up", "default tok/s"], step_rows)
    lines += ["", "## Linear layers alone (576 -> 1536, 300 matrices)", "",
              "GB/s of weights read, and in brackets the share of the copy bandwidth.", ""]
    lines += md_table(["threads", "rows M", "copy GB/s", "float32 torch", "float32 onednn",
                       "bfloat16 torch", "bfloat16 onednn"], lin_rows)
    lines += [""] + reading_section(OUT)
    OUT.write_text("\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(plot)
    w = 0.38
    ax.bar([i - w / 2 for i in range(len(xs))], [plot[b][0] * 100 for b in xs], w, label="reference (torch)")
    ax.bar([i + w / 2 for i in range(len(xs))], [plot[b][1] * 100 for b in xs], w, label="default (onednn + cpu)")
    ax.axhline(70, color="grey", ls="--", lw=1, label="goal at batch 8: 70%")
    ax.set_xticks(range(len(xs)), [f"batch {b}" for b in xs])
    ax.set_ylabel("% of memory-floor speed")
    ax.set_title("Decode step vs memory floor (1 thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
