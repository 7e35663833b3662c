"""How close the model's linear layers at decode batch sizes come to this machine's
memory floor (CPU): read bandwidth vs the weight bytes a float32 / bfloat16 linear reads.

    python -m bench.linear_floor        # writes bench/results/linear_floor.md

Read bandwidth: ``tensor.sum()`` over 512 MiB. Linear: SmolLM2's MLP shape (576 -> 1536),
300 distinct weight matrices (far beyond the caches) through ``F.linear`` at M rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.report import machine_info, md_table, reading_section


def _read_gbs() -> float:
    a = torch.randn(128 * 2**20)
    a.sum()
    t = time.perf_counter()
    for _ in range(5):
        a.sum()
    return a.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


def _linear_gbs(dtype: torch.dtype, m: int) -> float:
    ws = [torch.randn(1536, 576).to(dtype) for _ in range(300)]
    x = torch.randn(m, 576).to(dtype)
    for w in ws[:5]:
        torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for w in ws:
        torch.nn.functional.linear(x, w)
    return sum(w.numel() * w.element_size() for w in ws) / (time.perf_counter() - t) / 1e9


def main() -> None:
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        read = _read_gbs()
        for m in (1, 8, 32):
            f32, bf16 = _linear_gbs(torch.float32, m), _linear_gbs(torch.bfloat16, m)
            rows.append([threads, m, f"{read:.1f}", f"{f32:.1f}", f"{f32 / read:.0%}", f"{bf16:.1f}", f"{bf16 / read:.0%}"])
    out = Path("bench/results/linear_floor.md")
    m = machine_info()
    lines = ["# Linear layers against the memory floor (CPU)", "", "Reproduce: `python -m bench.linear_floor`", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {m['cpu']}, {m['logical_cpus']} logical CPUs; "
             f"torch {m['torch']}; git {m['git_commit']}", ""]
    lines += md_table(["threads", "rows M", "read GB/s", "float32 linear GB/s of weights", "of floor",
                       "bfloat16 linear GB/s", "of floor"], rows)
    lines += [""] + reading_section(out)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
