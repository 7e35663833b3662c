"""Offline generation throughput: the kvrelay Engine against Hugging Face transformers.

    python -m bench.throughput               # CPU: SmolLM2-135M-Instruct, float32 (make bench)
    python -m bench.throughput --quick       # smoke run (writes *_quick.* files)
    python -m bench.throughput --device cuda # GPU: random-weight Llama 1B / 8B shapes, bfloat16

Every system runs in the same process, on the same model, dtype and torch thread count,
generating exactly ``--gen-tokens`` tokens per request (greedy; min_tokens == max_tokens,
so no request stops early). Throughput is output tokens / wall-clock seconds from
submission to the last token (prefill included), measured with time.perf_counter.

Systems (CPU mode):
  kvrelay@N        N distinct prompts submitted to one Engine at once, run to completion
                   (prefix caching disabled, so prompts are all computed). N = 1 is the same
                   prompts as "HF one-at-a-time", submitted one after another.
  HF one-at-a-time transformers ``generate`` on one prompt at a time (a subset of prompts).
  HF batched@N     transformers ``generate`` on the same N prompts in one left-padded batch
                   (pad = eos, with an attention mask). Batched@1 is one-at-a-time.

Each system gets a warm-up run before it is timed. With ``--repeats R`` every cell is
measured R times, interleaving the systems, and the best (highest tokens/s) run is
reported: on a shared machine that is the run least disturbed by other processes. All
runs are kept in the JSON file.

GPU mode (``--device cuda``) is kept apart (see ``run_gpu``): random-weight Llama-shaped
models in bfloat16 on both sides, plus the engine's decode step time against the
memory-bandwidth floor. The CPU path never touches CUDA.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench.report import cpu_name, loadavg, pyplot, reading_section

# ---------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------

DEFAULTS = {
    # CPU: about 5-6 minutes on an idle 2-core machine
    "cpu": dict(gen_tokens=64, concurrency=[1, 4, 16, 64], single_prompts=4, repeats=2),
    "cuda": dict(gen_tokens=128, concurrency=[1, 4, 16, 64], single_prompts=4, repeats=2),
    "quick": dict(gen_tokens=8, concurrency=[1, 4], single_prompts=1, repeats=1),
}

# The targets (CPU).
TARGET_CONCURRENCY = 16
TARGET_SPEEDUP = 4.0  # kvrelay@16 / HF one-at-a-time, aggregate tokens/s
TARGET_SINGLE = 0.90  # kvrelay@1 / HF@1 decode tokens/s ("within 10%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Offline generation throughput of the kvrelay Engine vs transformers generate.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: few tokens, concurrency 1 and 4, one repeat")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available, else cpu. cuda runs the GPU mode (random-weight 1B/8B shapes)")
    p.add_argument("--gen-tokens", type=int, default=None, help="output tokens per request (default: 64 CPU, 128 GPU)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="numbers of concurrent requests (default: 1 4 16 64)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, for every system (default 2)")
    p.add_argument("--single-prompts", type=int, default=None,
                   help="prompts run one at a time (HF one-at-a-time and kvrelay@1; default 4)")
    p.add_argument("--hf-batch-max", type=int, default=None,
                   help="largest batch given to HF batched generate (default: no cap)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell; the best is reported (default 2)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[30, 120], metavar=("MIN", "MAX"),
                   help="prompt lengths in tokens, drawn uniformly (default 30 120)")
    p.add_argument("--model", default="default", help="CPU mode: model for both systems (default: embedded SmolLM2)")
    p.add_argument("--gpu-models", nargs="+", default=["1b", "8b"], help="GPU mode: model shapes (1b, 8b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="output directory (default bench/results)")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = DEFAULTS["quick"] if args.quick else DEFAULTS[args.device]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.concurrency = sorted(set(args.concurrency))
    if args.gen_tokens < 2:
        p.error("--gen-tokens must be at least 2 (decode speed needs two tokens)")
    if min(args.concurrency) < 1 or args.single_prompts < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--concurrency, --single-prompts, --repeats and --threads must be >= 1")
    lo, hi = args.prompt_len
    if not 1 <= lo <= hi:
        p.error("--prompt-len needs 1 <= MIN <= MAX")
    if args.hf_batch_max is None:
        args.hf_batch_max = max(args.concurrency)
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _no_sync() -> None:
    pass


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------

_SENTENCES = [
    "The river had frozen early that year, and the ferry sat idle against the dock.",
    "A cache stores the results of earlier work so that it need not be repeated.",
    "She counted the steps from the station to the library twice to be sure.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The committee postponed its decision until the engineers had finished the audit.",
    "Old maps often showed sea monsters where the cartographers lacked information.",
    "In distributed systems, a partition forces a choice between consistency and availability.",
    "The bakery on the corner sells rye bread only on Thursdays and Saturdays.",
    "Quantum computers exploit superposition to explore many states at once.",
    "He wrote the letter by hand because the printer had run out of ink again.",
    "Migrating birds navigate using the sun, the stars and the Earth's magnetic field.",
    "A good unit test checks one behaviour and fails with a clear message.",
    "The orchestra tuned to the oboe's A before the conductor walked on stage.",
    "Glaciers carve U-shaped valleys as they grind slowly down the mountains.",
    "Compound interest rewards patience more than almost any other financial habit.",
    "The museum's newest exhibit features tools used by Bronze Age metalworkers.",
    "Large language models predict the next token given all the tokens before it.",
    "Volunteers planted four hundred oak saplings along the eastern ridge last spring.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Satellites in geostationary orbit appear fixed in the sky above the equator.",
    "The detective noticed that the clock on the mantel had stopped at a quarter past nine.",
    "Rust's borrow checker rejects programs that could contain data races.",
    "Tea was first brought to Europe by Portuguese and Dutch traders.",
    "The marathon route passes through six neighbourhoods and crosses two bridges.",
    "Memory bandwidth, not arithmetic, often limits how fast a model decodes.",
    "Coral reefs cover a tiny fraction of the ocean floor yet shelter a quarter of marine species.",
    "The startup pivoted twice before finding customers who would pay for its product.",
    "Wind turbines are usually shut down when gusts exceed their rated speed.",
    "Her grandmother kept every postcard she had received since nineteen sixty-two.",
    "A binary search halves the remaining interval with every comparison.",
    "The lighthouse keeper logged the weather at dawn, noon and dusk each day.",
    "Fermentation gives sourdough its tang and makes the bread keep longer.",
]
_QUESTIONS = [
    "Summarize the text above in a few sentences.",
    "Continue the story in the same style.",
    "List the main topics mentioned above.",
    "Explain which sentence above is the most surprising, and why.",
]


def text_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n distinct prompts of real text, each between lo and hi tokens (uniform)."""
    prompts = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        target = rng.randint(lo, hi)
        question = tokenizer.encode(" " + rng.choice(_QUESTIONS))
        body: list[int] = tokenizer.encode(f"Note {i}:")
        while len(body) + len(question) < target:
            body += tokenizer.encode(" " + rng.choice(_SENTENCES))
        body = body[: max(target - len(question), 1)]
        prompts.append((body + question)[:target])
    return prompts


def random_prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n prompts of random token ids (GPU mode: random weights, no tokenizer)."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        out.append([rng.randrange(0, min(vocab, 128_000)) for _ in range(rng.randint(lo, hi))])
    return out


# ---------------------------------------------------------------------------------------
# the systems
# ---------------------------------------------------------------------------------------

_ids = itertools.count()


def run_kvrelay(engine, prompts: list[list[int]], gen: int, sync: Callable[[], None] = _no_sync) -> dict:
    """Submit every prompt at once and step the engine until all have finished."""
    from workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=gen, min_tokens=gen, temperature=0.0)
    rids = [f"bench-{next(_ids)}" for _ in prompts]
    outputs: dict[str, list[int]] = {r: [] for r in rids}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    decode_steps: list[tuple[float, int, int]] = []  # (seconds, batch size, context tokens read)
    sync()
    t0 = time.perf_counter()
    for rid, prompt in zip(rids, prompts):
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished:
        running = list(engine.requests.values())
        decode_only = all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        ctx = sum(r.num_tokens for r in running) if decode_only else 0
        ts = time.perf_counter()
        step_out = engine.step()
        sync()
        te = time.perf_counter()
        if decode_only and running:
            decode_steps.append((te - ts, len(running), ctx))
        for o in step_out:
            outputs[o.request_id] += o.new_token_ids
            first.setdefault(o.request_id, te)
            last[o.request_id] = te
    seconds = time.perf_counter() - t0
    outs = [outputs[r] for r in rids]
    bad = [len(o) for o in outs if len(o) != gen]
    if bad:
        raise RuntimeError(f"kvrelay produced {bad[:4]} tokens instead of {gen}")
    tokens = sum(len(o) for o in outs)
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "ttft_s": [first[r] - t0 for r in rids],
        "decode_seconds": sum(last[r] - first[r] for r in rids),  # single request: its decode time
        "decode_steps": decode_steps,
        "outputs": outs,
    }


def run_kvrelay_sequential(engine, prompts, gen, sync=_no_sync) -> dict:
    """Concurrency 1: each prompt alone, one after another."""
    runs = [run_kvrelay(engine, [p], gen, sync) for p in prompts]
    return _combine_sequential(runs, gen)


def _combine_sequential(runs: list[dict], gen: int) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    decode = sum(r["decode_seconds"] for r in runs)
    out = {
        "requests": len(runs),
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "decode_tok_s": len(runs) * (gen - 1) / decode if decode > 0 else float("nan"),
        "ttft_s": [r["ttft_s"][0] for r in runs],
        "outputs": [r["outputs"][0] for r in runs],
    }
    if "decode_steps" in runs[0]:
        out["decode_steps"] = [s for r in runs for s in r["decode_steps"]]
    return out


class _TokenStamps:
    """A transformers streamer that only records when each put() happens: the first put is
    the prompt (before prefill), then one put per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:  # value is already on the host (generate calls .cpu())
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model, input_ids, attention_mask, gen: int, pad_id: int, streamer=None):
    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=gen,
            min_new_tokens=gen,
            pad_token_id=pad_id,
            streamer=streamer,
        )


def run_hf_single(model, prompts, gen, pad_id, device, sync=_no_sync) -> dict:
    """transformers generate, one prompt at a time."""
    runs = []
    for p in prompts:
        ids = torch.tensor([p], dtype=torch.long, device=device)
        stamps = _TokenStamps()
        sync()
        t0 = time.perf_counter()
        out = _hf_generate(model, ids, torch.ones_like(ids), gen, pad_id, stamps)
        sync()
        seconds = time.perf_counter() - t0
        new = out[0, len(p):].tolist()
        if len(new) != gen:
            raise RuntimeError(f"transformers produced {len(new)} tokens instead of {gen}")
        t = stamps.times  # [prompt, token 1, ..., token gen]
        runs.append({
            "tokens": gen, "seconds": seconds, "tok_s": gen / seconds,
            "ttft_s": [t[1] - t0], "decode_seconds": t[-1] - t[1], "outputs": [new],
        })
    return _combine_sequential(runs, gen)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a tokenizer with padding_side='left' returns: pads first, then the prompt."""
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def run_hf_batched(model, prompts, gen, pad_id, device, sync=_no_sync) -> dict:
    """transformers generate on all prompts as one left-padded batch."""
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    sync()
    t0 = time.perf_counter()
    out = _hf_generate(model, ids, mask, gen, pad_id)
    sync()
    seconds = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    if new.shape[1] != gen:
        raise RuntimeError(f"transformers produced {new.shape[1]} tokens instead of {gen}")
    tokens = new.numel()
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
        "padded_width": int(ids.shape[1]), "outputs": new.tolist(),
    }


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def _best(runs: list[dict]) -> dict | None:
    return max(runs, key=lambda r: r["tok_s"]) if runs else None


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(requests whose greedy outputs are identical, requests compared)."""
    return sum(x == y for x, y in zip(a, b)), min(len(a), len(b))


def _slim(run: dict) -> dict:
    """A run without its token ids and per-step list (for the JSON)."""
    out = {k: v for k, v in run.items() if k not in ("outputs", "decode_steps")}
    if "decode_steps" in run:
        steps = run["decode_steps"]
        out["decode_steps"] = len(steps)
        out["decode_step_mean_s"] = sum(s[0] for s in steps) / len(steps) if steps else None
    return out


# ---------------------------------------------------------------------------------------
# the measurement schedule (both modes)
# ---------------------------------------------------------------------------------------

def measure(args, engine, hf_model, prompts, pad_id, device, sync, *, engine_first_then_free=None) -> dict:
    """Warm up, then time every system ``args.repeats`` times.

    With ``engine_first_then_free`` (GPU mode: two big models do not share the device),
    every kvrelay run happens first, then the callable frees the engine and returns the
    HF model; otherwise (CPU) the systems are interleaved cell by cell."""
    gen, conc = args.gen_tokens, args.concurrency
    single = prompts[: args.single_prompts]
    batched_ns = [n for n in conc if n > 1]
    runs: dict = {"kvrelay": {n: [] for n in conc}, "hf_batched": {n: [] for n in batched_ns if n <= args.hf_batch_max},
                  "hf_single": []}

    def kv(n):
        t = time.perf_counter()
        r = run_kvrelay_sequential(engine, single, gen, sync) if n == 1 else run_kvrelay(engine, prompts[:n], gen, sync)
        runs["kvrelay"][n].append(r)
        log(f"  kvrelay@{n}: {r['tok_s']:.1f} tok/s ({time.perf_counter() - t:.1f}s)")

    def hf_single():
        t = time.perf_counter()
        r = run_hf_single(hf_model, single, gen, pad_id, device, sync)
        runs["hf_single"].append(r)
        log(f"  HF one-at-a-time: {r['tok_s']:.1f} tok/s ({time.perf_counter() - t:.1f}s)")

    def hf_batch(n):
        t = time.perf_counter()
        r = run_hf_batched(hf_model, prompts[:n], gen, pad_id, device, sync)
        runs["hf_batched"][n].append(r)
        log(f"  HF batched@{n}: {r['tok_s']:.1f} tok/s ({time.perf_counter() - t:.1f}s)")

    warm = prompts[: min(4, len(prompts))]
    warm_gen = min(gen, 8)

    def warm_engine():
        t = time.perf_counter()
        run_kvrelay(engine, warm, warm_gen, sync)
        run_kvrelay(engine, warm[:1], warm_gen, sync)
        log(f"warm-up kvrelay ({time.perf_counter() - t:.1f}s)")

    def warm_hf():
        t = time.perf_counter()
        run_hf_single(hf_model, warm[:1], warm_gen, pad_id, device, sync)
        if runs["hf_batched"]:
            run_hf_batched(hf_model, warm, warm_gen, pad_id, device, sync)
        log(f"warm-up transformers ({time.perf_counter() - t:.1f}s)")

    if engine_first_then_free is None:
        warm_engine()
        warm_hf()
        for rep in range(args.repeats):
            log(f"repeat {rep + 1}/{args.repeats}")
            if 1 not in conc:
                hf_single()
            for n in conc:
                kv(n)
                if n == 1:
                    hf_single()
                elif n in runs["hf_batched"]:
                    hf_batch(n)
    else:
        warm_engine()
        for rep in range(args.repeats):
            for n in conc:
                kv(n)
        engine = None  # drop this frame's reference so the callable can free the engine
        hf_model = engine_first_then_free()
        warm_hf()
        for rep in range(args.repeats):
            hf_single()
            for n in runs["hf_batched"]:
                hf_batch(n)
    return runs


def summarize(args, runs: dict) -> dict:
    """Best run per cell, ratios and the targets."""
    hf1 = _best(runs["hf_single"])
    rows = []
    for n in args.concurrency:
        kv = _best(runs["kvrelay"][n])
        if n == 1:
            hb, hb_note = hf1, "batch of 1 = one-at-a-time"
        elif n in runs["hf_batched"]:
            hb, hb_note = _best(runs["hf_batched"][n]), ""
        else:
            hb, hb_note = None, f"not run (capped at --hf-batch-max {args.hf_batch_max})"
        row = {
            "concurrency": n,
            "kvrelay_tok_s": kv["tok_s"],
            "hf_batched_tok_s": hb["tok_s"] if hb else None,
            "hf_batched_note": hb_note,
            "hf_single_tok_s": hf1["tok_s"],
            "kvrelay_over_hf_single": kv["tok_s"] / hf1["tok_s"],
            "kvrelay_over_hf_batched": kv["tok_s"] / hb["tok_s"] if hb else None,
            "kvrelay_mean_ttft_s": sum(kv["ttft_s"]) / len(kv["ttft_s"]),
        }
        if hb and n > 1:
            same, total = _agreement(kv["outputs"], hb["outputs"])
            row["greedy_agreement_vs_hf_batched"] = f"{same}/{total}"
        rows.append(row)

    kv1 = _best(runs["kvrelay"][1]) if 1 in runs["kvrelay"] else None
    single = None
    if kv1 is not None:
        # decode speed: best decode tokens/s over the repeats, each side
        kv_dec = max(r["decode_tok_s"] for r in runs["kvrelay"][1])
        hf_dec = max(r["decode_tok_s"] for r in runs["hf_single"])
        same, total = _agreement(kv1["outputs"], hf1["outputs"])
        single = {
            "kvrelay_decode_tok_s": kv_dec,
            "hf_decode_tok_s": hf_dec,
            "ratio": kv_dec / hf_dec,
            "kvrelay_e2e_tok_s": kv1["tok_s"],
            "hf_e2e_tok_s": hf1["tok_s"],
            "e2e_ratio": kv1["tok_s"] / hf1["tok_s"],
            "greedy_agreement": f"{same}/{total}",
        }
    targets = {}
    row16 = next((r for r in rows if r["concurrency"] == TARGET_CONCURRENCY), None)
    if row16 is not None:
        targets["throughput_at_16"] = {
            "value": row16["kvrelay_over_hf_single"], "target": TARGET_SPEEDUP,
            "pass": row16["kvrelay_over_hf_single"] >= TARGET_SPEEDUP,
        }
    if single is not None:
        targets["single_request_decode"] = {
            "value": single["ratio"], "target": TARGET_SINGLE, "pass": single["ratio"] >= TARGET_SINGLE,
        }
    return {"rows": rows, "single": single, "targets": targets}


def _fmt(x, spec=".1f", none="—") -> str:
    return none if x is None else format(x, spec)


def table_md(summary: dict, args) -> list[str]:
    lines = [
        "| concurrency N | kvrelay@N tok/s | HF batched@N tok/s | HF one-at-a-time tok/s "
        "| kvrelay@N / HF one-at-a-time | kvrelay@N / HF batched@N | kvrelay mean TTFT (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        hb = _fmt(r["hf_batched_tok_s"])
        if r["hf_batched_note"]:
            hb += f" ({r['hf_batched_note']})"
        ratio_b = _fmt(r["kvrelay_over_hf_batched"], ".2f")
        lines.append(
            f"| {r['concurrency']} | {r['kvrelay_tok_s']:.1f} | {hb} | {r['hf_single_tok_s']:.1f} "
            f"| {r['kvrelay_over_hf_single']:.2f}x | {ratio_b}{'x' if r['kvrelay_over_hf_batched'] else ''} "
            f"| {r['kvrelay_mean_ttft_s']:.2f} |"
        )
    return lines


def targets_md(summary: dict) -> list[str]:
    t = summary["targets"]
    lines = ["| target | measured | result |", "|---|---:|:---:|"]
    if "throughput_at_16" in t:
        x = t["throughput_at_16"]
        lines.append(f"| kvrelay@{TARGET_CONCURRENCY} ≥ {TARGET_SPEEDUP:.0f}x HF one-at-a-time (aggregate tok/s) "
                     f"| {x['value']:.2f}x | {'PASS' if x['pass'] else 'FAIL'} |")
    else:
        lines.append(f"| kvrelay@{TARGET_CONCURRENCY} ≥ {TARGET_SPEEDUP:.0f}x HF one-at-a-time | not measured "
                     f"(16 not in --concurrency) | n/a |")
    if "single_request_decode" in t:
        x = t["single_request_decode"]
        lines.append(f"| single-request decode ≥ {TARGET_SINGLE:.2f}x HF (within 10%) "
                     f"| {x['value']:.2f}x | {'PASS' if x['pass'] else 'FAIL'} |")
    return lines


def single_md(s: dict | None) -> list[str]:
    if s is None:
        return []
    return [
        "| single request (concurrency 1) | kvrelay | HF | kvrelay / HF |",
        "|---|---:|---:|---:|",
        f"| decode tok/s (tokens 2..G, prefill excluded) | {s['kvrelay_decode_tok_s']:.1f} | {s['hf_decode_tok_s']:.1f} "
        f"| {s['ratio']:.2f}x |",
        f"| end-to-end tok/s (prefill included) | {s['kvrelay_e2e_tok_s']:.1f} | {s['hf_e2e_tok_s']:.1f} "
        f"| {s['e2e_ratio']:.2f}x |",
        f"| identical greedy outputs | {s['greedy_agreement']} | | |",
    ]




def _command(argv: list[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m bench.throughput", *map(shlex.quote, argv)])




def plot(path: Path, panels: list[tuple[str, list[int], dict]], title: str) -> None:
    """panels: (title, concurrency, runs summary) — tokens/s vs concurrency, log-x."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (name, conc, summ) in zip(axes[0], panels):
        rows = summ["rows"]
        xs = [r["concurrency"] for r in rows]
        ax.plot(xs, [r["kvrelay_tok_s"] for r in rows], "o-", label="kvrelay Engine (continuous batching)")
        hb = [(r["concurrency"], r["hf_batched_tok_s"]) for r in rows if r["hf_batched_tok_s"] is not None]
        if hb:
            ax.plot(*zip(*hb), "s--", label="transformers generate, batched (left-padded)")
        ax.axhline(rows[0]["hf_single_tok_s"], color="gray", linestyle=":",
                   label="transformers generate, one at a time")
        for r in rows:
            ax.annotate(f"{r['kvrelay_over_hf_single']:.1f}x", (r["concurrency"], r["kvrelay_tok_s"]),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.text(0.99, 0.02, "labels: kvrelay@N / transformers one-at-a-time", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="dimgray")
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc)
        ax.set_xticklabels([str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.set_ylim(bottom=0)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _runs_json(runs: dict) -> dict:
    return {
        "kvrelay": {str(n): [_slim(r) for r in rs] for n, rs in runs["kvrelay"].items()},
        "hf_batched": {str(n): [_slim(r) for r in rs] for n, rs in runs["hf_batched"].items()},
        "hf_single": [_slim(r) for r in runs["hf_single"]],
    }


# ---------------------------------------------------------------------------------------
# CPU mode
# ---------------------------------------------------------------------------------------

def run_cpu(args, argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from router.tokenizer import load_tokenizer
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.loader import load_model, resolve_model

    t_start = time.perf_counter()
    load_before = loadavg()
    _quiet_transformers()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = torch.float32

    src = resolve_model(args.model)
    if src.kind != "gguf":
        raise SystemExit("CPU mode loads the transformers side from a GGUF file; pass a .gguf --model")
    tok = load_tokenizer(src)
    pad_id = tok.eos_token_id if tok.hf.pad_token_id is None else tok.hf.pad_token_id
    tok.hf.padding_side = "left"  # what left_pad() does by hand

    n_prompts = max(max(args.concurrency), args.single_prompts)
    lo, hi = args.prompt_len
    prompts = text_prompts(tok, n_prompts, lo, hi, args.seed)

    log(f"loading {src.model_id} for kvrelay and for transformers ({dtype}, {args.threads} threads)")
    loaded = load_model(src, dtype=dtype, device=device)
    hf_model = AutoModelForCausalLM.from_pretrained(str(src.directory), gguf_file=src.path.name, dtype=dtype).eval()

    block = 16
    blocks_per_seq = math.ceil((hi + args.gen_tokens) / block) + 1
    cfg = EngineConfig(
        model=args.model, dtype="float32", device="cpu", block_size=block,
        num_kv_blocks=max(max(args.concurrency), 4) * blocks_per_seq + 16,
        max_num_seqs=max(max(args.concurrency), 4),
        enable_prefix_caching=False,  # every prompt is computed in full, as transformers does
        num_threads=args.threads,
    )
    engine = Engine(cfg, loaded=loaded)
    assert torch.get_num_threads() == args.threads
    log(f"loaded in {time.perf_counter() - t_start:.1f}s; measuring")

    t_measure = time.perf_counter()
    runs = measure(args, engine, hf_model, prompts, pad_id, device, _no_sync)
    measure_s = time.perf_counter() - t_measure
    summary = summarize(args, runs)
    total_s = time.perf_counter() - t_start

    plens = [len(p) for p in prompts]
    meta = {
        "mode": "cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command(argv),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "dtype": "float32",
        "model": f"{src.model_id} ({src.path.name}, dequantized to float32 by each side)",
        "gen_tokens": args.gen_tokens,
        "concurrency": args.concurrency,
        "single_prompts": args.single_prompts,
        "repeats": args.repeats,
        "hf_batch_max": args.hf_batch_max,
        "prompt_tokens": {"min": min(plens), "max": max(plens), "mean": round(sum(plens) / len(plens), 1)},
        "engine": {"prefix_caching": False, "block_size": block, "max_num_seqs": cfg.max_num_seqs,
                   "max_num_batched_tokens": cfg.max_num_batched_tokens, "chunk_size": cfg.chunk_size,
                   "attention_backend": engine.runner.backend.name,
                   "linear_kernel": engine.linear_kernel},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "measure_seconds": round(measure_s, 1),
        "total_seconds": round(total_s, 1),
    }
    _write(args, meta, summary, runs, suffix="")
    return 0


def _write(args, meta: dict, summary: dict, runs: dict, suffix: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput" + suffix + ("_quick" if args.quick else "")
    m = meta
    md = [
        f"# Offline generation throughput: kvrelay vs transformers ({'CPU' if m['mode'] == 'cpu' else 'GPU'})",
        "",
        f"Reproduce: `{m['command']}`",
        "",
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| CPU | {m['cpu']} ({m['cpu_count']} logical CPUs) |",
        f"| torch / transformers / python | {m['torch']} / {m['transformers']} / {m['python']} |",
        f"| torch threads (every system) | {m['threads']} |",
        f"| dtype | {m['dtype']} |",
        f"| model | {m['model']} |",
        f"| generated tokens per request | {m['gen_tokens']} (greedy, min_tokens == max_tokens) |",
        f"| prompt tokens | {m['prompt_tokens']['min']}–{m['prompt_tokens']['max']} "
        f"(mean {m['prompt_tokens']['mean']}), distinct prompts |",
        f"| one-at-a-time prompts | {m['single_prompts']} (kvrelay@1 and HF one-at-a-time run the same ones) |",
        f"| repeats per cell | {m['repeats']} (best run reported; all runs in {stem}.json) |",
        f"| kvrelay engine | prefix caching **off**, block {m['engine']['block_size']}, "
        f"max_num_seqs {m['engine']['max_num_seqs']}, max_num_batched_tokens {m['engine']['max_num_batched_tokens']}, "
        f"chunk {m['engine']['chunk_size']}, attention backend {m['engine']['attention_backend']}, "
        f"linear kernel {m['engine'].get('linear_kernel', 'torch')} |",
        f"| load average before / after | {m['loadavg_before']} / {m['loadavg_after']} |",
        f"| run time | {m['total_seconds']:.0f}s ({m['measure_seconds']:.0f}s measuring) |",
    ]
    if "gpu" in m:
        md.insert(9, f"| GPU | {m['gpu']}; measured device copy bandwidth {m['copy_bandwidth_gb_s']} GB/s "
                     f"(read + write of a 1 GiB tensor copy) |")
    if m["mode"] == "cpu":
        md += ["", "## Output tokens/s", "", *table_md(summary, args), "",
               "## Single-request decode", "", *single_md(summary["single"]), "",
               "## Targets (CPU)", "", *targets_md(summary)]
    else:
        for name, s in summary.items():
            md += ["", f"## {name}", "", *table_md(s, args), "", *single_md(s["single"]), "",
                   "Decode step time against the memory-bandwidth floor (kvrelay, decode-only steps): "
                   "floor = (weight bytes read + KV bytes read) / measured device copy bandwidth.", "",
                   *floor_md(s["floor"])]
    md += [
        "",
        "Notes: tokens/s = output tokens / wall-clock seconds from submission to the last token "
        "(prefill included). kvrelay@1 and HF one-at-a-time run the same prompts one after another; "
        "HF batched@N left-pads the same N prompts (pad = eos) with an attention mask. Decode tok/s "
        "excludes the first token (prefill). Each system is warmed up before it is timed.",
    ]
    if m["mode"] == "cpu":
        md.append("The machine may be shared with other processes: the numbers are noisy "
                  "(see the load average and the per-run numbers in the JSON).")
    md += ["", *reading_section(out / f"{stem}.md")]
    (out / f"{stem}.md").write_text("\n".join(md))
    panels = ([("", args.concurrency, summary)] if m["mode"] == "cpu"
              else [(name, args.concurrency, s) for name, s in summary.items()])
    title = (f"{m['model'].split(' (')[0]}, {m['dtype']}, {m['threads']} threads, {m['gen_tokens']} tokens/request"
             if m["mode"] == "cpu" else f"random-weight Llama shapes, {m['dtype']}, {m['gen_tokens']} tokens/request")
    plot(out / f"{stem}.png", panels, title)
    payload = {"meta": meta}
    if m["mode"] == "cpu":
        payload |= {"summary": summary, "runs": _runs_json(runs)}
    else:
        payload |= {"summary": summary, "runs": {name: _runs_json(r) for name, r in runs.items()}}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print("\n".join(md))
    log(f"wrote {out / stem}.md, .png, .json")


# ---------------------------------------------------------------------------------------
# GPU mode (--device cuda): random-weight Llama shapes in bfloat16 + bandwidth floor
# ---------------------------------------------------------------------------------------

# Llama-3.2-1B and Llama-3.1-8B shapes (1B ties its embeddings, as the real model does).
GPU_SHAPES = {
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
               vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
               vocab_size=128256, tie_word_embeddings=False),
}


def measure_copy_bandwidth(device: torch.device, sync: Callable[[], None], nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device tensor copy, counting read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    iters = 20
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync()
    seconds = time.perf_counter() - t
    del src, dst
    return 2 * nbytes * iters / seconds


def _engine_weight_bytes_per_step(model) -> int:
    """Weight bytes one decode step reads: every parameter once, except the embedding table
    when it is not also the LM head (decode only gathers a few of its rows)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    emb = model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def floor_analysis(decode_steps: list[tuple[float, int, int]], weight_bytes: int, kv_bytes_per_token: int,
                   bandwidth: float) -> dict:
    """Measured decode step time vs (weight bytes + KV bytes read) / bandwidth, averaged over steps."""
    if not decode_steps:
        return {}
    n = len(decode_steps)
    actual = sum(s[0] for s in decode_steps) / n
    kv = sum(s[2] for s in decode_steps) / n * kv_bytes_per_token
    floor = (weight_bytes + kv) / bandwidth
    return {
        "decode_steps": n, "batch": round(sum(s[1] for s in decode_steps) / n, 1),
        "step_ms": actual * 1e3, "floor_ms": floor * 1e3, "floor_over_actual": floor / actual,
        "weight_gb": weight_bytes / 1e9, "kv_gb_per_step": kv / 1e9,
    }


def floor_md(rows: list[dict]) -> list[str]:
    lines = ["| N | decode steps | mean batch | weights GB | KV GB read / step | step ms | floor ms "
             "| floor / step (bandwidth utilization) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r.get("step_ms"):
            continue
        lines.append(f"| {r['concurrency']} | {r['decode_steps']} | {r['batch']} | {r['weight_gb']:.2f} "
                     f"| {r['kv_gb_per_step']:.3f} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} "
                     f"| {r['floor_over_actual'] * 100:.0f}% |")
    return lines


def _hf_llama(shape: dict, dtype: torch.dtype, device: torch.device, max_pos: int, eos: int):
    """transformers' LlamaForCausalLM of the same shape, randomly initialised on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["hidden_size"] // shape["num_heads"], max_position_embeddings=max_pos,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=shape["tie_word_embeddings"],
        bos_token_id=None, eos_token_id=eos, pad_token_id=0,
    )
    hcfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bfloat16 (an 8B model in float32 is 32 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()


def run_gpu(args, argv=None, device: torch.device | None = None) -> int:
    """The GPU table: same systems and ratios, random-weight 1B/8B shapes in bfloat16,
    and kvrelay's decode step time against the memory-bandwidth floor."""
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.loader import random_model
    from workers.model.config import ModelConfig

    t_start = time.perf_counter()
    _quiet_transformers()
    torch.set_num_threads(args.threads)
    device = device or torch.device("cuda")
    is_cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if is_cuda else _no_sync
    dtype = torch.bfloat16
    bandwidth = measure_copy_bandwidth(device, sync)
    log(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")

    lo, hi = args.prompt_len
    max_pos = 8192
    eos = 128001
    summaries, all_runs, extra = {}, {}, {}
    for key in args.gpu_models:
        shape = GPU_SHAPES[key]
        name = (f"Llama {key.upper()} shape (random weights): hidden {shape['hidden_size']}, "
                f"{shape['num_layers']} layers, {shape['num_heads']}/{shape['num_kv_heads']} heads, "
                f"intermediate {shape['intermediate_size']}, vocab {shape['vocab_size']}")
        log(name)
        mcfg = ModelConfig(
            vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
            intermediate_size=shape["intermediate_size"], num_layers=shape["num_layers"],
            num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
            head_dim=shape["hidden_size"] // shape["num_heads"], max_position_embeddings=max_pos,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=shape["tie_word_embeddings"],
            eos_token_ids=(eos,), name=f"llama-{key}-random",
        )
        prompts = random_prompts(mcfg.vocab_size, max(max(args.concurrency), args.single_prompts), lo, hi, args.seed)
        plens = [len(p) for p in prompts]
        prompt_stats = {"min": min(plens), "max": max(plens), "mean": round(sum(plens) / len(plens), 1)}
        loaded = random_model(mcfg, dtype=dtype, device=device, seed=args.seed)
        block = 16
        max_n = max(max(args.concurrency), 4)
        cfg = EngineConfig(
            dtype="bfloat16", device=str(device), block_size=block,
            num_kv_blocks=max_n * (math.ceil((hi + args.gen_tokens) / block) + 1) + 16,
            max_num_seqs=max_n, enable_prefix_caching=False, num_threads=args.threads,
        )
        engine = Engine(cfg, loaded=loaded)
        weight_bytes = _engine_weight_bytes_per_step(loaded.model)
        kv_bytes_per_token = mcfg.kv_bytes_per_token * torch.tensor([], dtype=dtype).element_size()
        backend = engine.runner.backend.name

        def free_engine_build_hf():
            nonlocal engine, loaded
            engine = loaded = None
            gc.collect()
            if is_cuda:
                torch.cuda.empty_cache()
            log("building the transformers model")
            return _hf_llama(shape, dtype, device, max_pos, eos)

        runs = measure(args, engine, None, prompts, 0, device, sync, engine_first_then_free=free_engine_build_hf)
        s = summarize(args, runs)
        s["floor"] = []
        for n in args.concurrency:
            best = _best(runs["kvrelay"][n])
            s["floor"].append({"concurrency": n,
                               **floor_analysis(best["decode_steps"], weight_bytes, kv_bytes_per_token, bandwidth)})
        summaries[name] = s
        all_runs[name] = runs
        extra[name] = {"attention_backend": backend, "weight_bytes_per_step": weight_bytes,
                       "kv_bytes_per_token": kv_bytes_per_token}
        gc.collect()
        if is_cuda:
            torch.cuda.empty_cache()

    meta = {
        "mode": "gpu",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command(argv),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if is_cuda else str(device),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "model": "random-weight Llama shapes: " + ", ".join(args.gpu_models),
        "gen_tokens": args.gen_tokens,
        "concurrency": args.concurrency,
        "single_prompts": args.single_prompts,
        "repeats": args.repeats,
        "hf_batch_max": args.hf_batch_max,
        "prompt_tokens": prompt_stats,
        "engine": {"prefix_caching": False, "block_size": 16, "max_num_seqs": max(max(args.concurrency), 4),
                   "max_num_batched_tokens": EngineConfig().max_num_batched_tokens,
                   "chunk_size": EngineConfig().chunk_size,
                   "attention_backend": ", ".join(sorted({e['attention_backend'] for e in extra.values()}))},
        "models": extra,
        "loadavg_before": None,
        "loadavg_after": loadavg(),
        "measure_seconds": round(time.perf_counter() - t_start, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    _write(args, meta, summaries, all_runs, suffix="_gpu")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return run_gpu(args, argv)
    return run_cpu(args, argv)


if __name__ == "__main__":
    sys.exit(main())
