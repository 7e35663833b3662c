"""bfloat16 weights against float32 on CPU: greedy agreement and decode speed, side by side.

    python -m bench.bf16            # writes bench/results/bf16.{md,json}

The same prompts (real text, 30-120 tokens) run greedily through two engines in one
process: the float32 default and ``dtype=bfloat16`` (weights and KV in bfloat16; torch's
CPU matmuls accumulate in float32). Agreement: outputs identical token for token, and the
mean number of leading tokens that match. Speed: decode steps at batch 1, 8 and 32,
interleaved between the two engines, in process CPU time (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.report import machine_info, md_table, reading_section
from bench.throughput import text_prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bf16", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.grammar import load_hf_tokenizer
    from workers.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    engines = {d: Engine(EngineConfig(dtype=d, enable_prefix_caching=False, num_threads=args.threads))
               for d in ("float32", "bfloat16")}
    tok = load_hf_tokenizer(engines["float32"].loaded.source)
    prompts = text_prompts(tok, args.prompts, 30, 120, seed=0)
    params = SamplingParams(max_tokens=args.gen_tokens, min_tokens=args.gen_tokens, temperature=0.0)
    outs = {d: e.generate(prompts, params) for d, e in engines.items()}
    same = sum(a == b for a, b in zip(outs["float32"], outs["bfloat16"]))
    prefix = []
    for a, b in zip(outs["float32"], outs["bfloat16"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n)
    speed = {}
    for batch in (1, 8, 32):
        times: dict[str, list[float]] = {d: [] for d in engines}
        for d, e in engines.items():
            for i in range(batch):
                e.add_request(f"s{batch}-{i}", prompts[i % len(prompts)], params)
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in e.requests.values()):
                e.step()
        for _ in range(12):
            for d, e in engines.items():
                t = time.process_time()
                e.step()
                times[d].append(time.process_time() - t)
        for d, e in engines.items():
            for rid in list(e.requests):
                e.abort(rid)
        speed[batch] = {d: sorted(v)[len(v) // 2] for d, v in times.items()}
    data = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
            "identical": same, "prompts": len(prompts), "mean_matching_prefix": sum(prefix) / len(prefix),
            "matching_prefix": prefix, "decode_step_cpu_s": speed}
    out = Path(args.out)
    (out / "bf16.json").write_text(json.dumps(data, indent=1))
    md = out / "bf16.md"
    keep = reading_section(md)
    m = data["machine"]
    lines = ["# bfloat16 weights vs float32 on CPU", "", "Reproduce: `python -m bench.bf16`", "",
             f"{data['date']}; {m['cpu']}, {m['logical_cpus']} logical CPUs; torch {m['torch']}; "
             f"{args.threads} torch thread(s); git {m['git_commit']}", "",
             "## Greedy agreement", ""]
    lines += md_table(["prompts", "generated tokens each", "identical outputs", "mean leading tokens that match"],
                      [[len(prompts), args.gen_tokens, f"{same}/{len(prompts)}", f"{data['mean_matching_prefix']:.1f}"]])
    lines += ["", "## Decode step (process CPU time, median of 12 interleaved steps)", ""]
    lines += md_table(["batch", "float32 (ms)", "bfloat16 (ms)", "bfloat16 speed-up"],
                      [[b, f"{1000 * s['float32']:.1f}", f"{1000 * s['bfloat16']:.1f}", f"{s['float32'] / s['bfloat16']:.2f}x"]
                       for b, s in speed.items()])
    lines += [""] + keep
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
