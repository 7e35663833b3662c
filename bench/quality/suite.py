"""The compression quality suite: RULER tasks (bench/quality/tasks.py) through the real
serving path, every compression configuration on the same items, side by side in one run.

    python -m bench.quality.suite                      # full run -> bench/results/quality.{md,json,png}
    python -m bench.quality.suite --quick              # 2 items per task at 1k, 3 configs; prints only
    python -m bench.quality.suite --render bench/results/quality.json   # .md/.png again (keeps the Reading)

The server: one ``kvrelay serve`` (bench/server.py), 1 prefill + 1 decode worker (Ray
actors, one torch thread each), KV over UCX, the embedded SmolLM2-135M-Instruct. Its
config file names every configuration of the sweep as an operator preset
(``transfer.compression.presets``), so one server runs them all and every request
picks one with ``kv_compression``; the learned budgets come from
``transfer.compression.profile``.

Per item, the configurations run one after another on the same prompt: sparse ones
first (the first computes the prompt in full; the prefill worker's prefix cache serves
the rest, which recompute only the observation window), then the dense lossy ones,
``none`` last. The decode worker never holds an exact page of the prompt while a lossy
configuration runs (compressed blocks are never cached), so every request ships the
whole prompt but its first 16-token block (the ``[item id]`` tag makes every item's
first block unique; no two items share KV). Items run ``--concurrency`` at a time.

Per request: chat endpoint, greedy, ``max_tokens`` 32 (RULER's answers fit; the greedy
agreement is over these 32 tokens), scored with RULER's metric (tasks.score). Per
configuration: accuracy per task and length, pooled accuracy (Wilson 95%), the loss vs
``none`` on the same items (mean paired difference, normal 95% interval of the paired
differences), items lost/gained, greedy agreement with ``none`` (identical 32-token
output, and the mean common prefix in tokens), and from the workers' counters: wire
bytes vs the shipped tokens' KV in 16 bits, the mean kept fraction, fallbacks.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.report import cpu_name, pyplot, reading_section
from bench.compression import metric_deltas
from bench.needle import wilson
from bench.server import Server, log

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
PROFILE = ROOT / "workers" / "budget_profiles" / "smollm2-135m-instruct.json"
MAX_TOKENS = 32

# name -> operator preset (a built-in with overrides). Built-in presets are used by name.
SWEEP: dict[str, dict[str, Any]] = {
    "s0.125": {"preset": "max", "keep": 0.125, "quantization": "none", "budgets": "uniform"},
    "s0.25": {"preset": "max", "keep": 0.25, "quantization": "none", "budgets": "uniform"},
    "s0.5": {"preset": "max", "keep": 0.5, "quantization": "none", "budgets": "uniform"},
    "s0.125+int4": {"preset": "max", "keep": 0.125, "budgets": "uniform"},
    "s0.25+int4 pyramid": {"preset": "max", "keep": 0.25, "budgets": "pyramid"},  # max until 2026-12-03
    "s0.125+int4 learned": {"preset": "max", "keep": 0.125, "budgets": "learned"},
    "s0.25+int4 learned": {"preset": "max", "keep": 0.25, "budgets": "learned"},
    "s0.5+int4 learned": {"preset": "max", "keep": 0.5, "budgets": "learned"},
}
BUILT_IN = ["none", "int8", "fp8", "int4", "balanced", "max"]
QUICK_CONFIGS = ["none", "max", "s0.25+int4 learned"]
SERVER_ENGINE = {"max_model_len": 8192, "kv_cache_memory_gb": 2.0}
SERVER_DEADLINES = {"prefill_s": 900, "reserve_s": 300, "transfer_s": 300, "token_s": 300, "startup_s": 600}


def is_sparse(name: str) -> bool:
    from cluster.compression import PRESETS, PresetOverrides

    s = PRESETS[name] if name in PRESETS else PresetOverrides(**SWEEP[name]).settings()
    return s.sparse


def order_configs(configs: list[str]) -> list[str]:
    """Sparse first, dense lossy next, ``none`` last (see the module docstring)."""
    return sorted(configs, key=lambda c: (c == "none", not is_sparse(c)))


def server_config(configs: list[str], profile: Path) -> dict[str, Any]:
    return {"transfer": {"compression": {"presets": {c: SWEEP[c] for c in configs if c in SWEEP},
                                         "profile": str(profile)}}}


@dataclass
class Job:
    item: Any  # tasks.QualityItem
    configs: list[str]


async def chat(client, url: str, model: str, messages: list[dict], config: str, timeout_s: float) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "kv_compression": config}
    t0 = time.perf_counter()
    try:
        r = await client.post(url + "/v1/chat/completions", json=body, timeout=timeout_s)
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:300]}", "seconds": time.perf_counter() - t0}
        j = r.json()
        return {"ok": True, "text": j["choices"][0]["message"]["content"] or "", "seconds": time.perf_counter() - t0,
                "prompt_tokens": j["usage"]["prompt_tokens"], "completion_tokens": j["usage"]["completion_tokens"],
                "cached_tokens": (j["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")}
    except Exception as e:  # noqa: BLE001 - recorded; the run goes on
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}


async def run_jobs(url: str, model: str, jobs: list[Job], concurrency: int, records_path: Path | None,
                   done: set[tuple[str, str]]) -> list[dict]:
    import httpx

    from bench.quality import tasks

    queue: asyncio.Queue[Job] = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    records: list[dict] = []
    total = sum(len(j.configs) for j in jobs) - len(done)
    out = open(records_path, "a") if records_path else None
    async with httpx.AsyncClient() as client:

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                it = job.item
                for config in job.configs:
                    if (it.id, config) in done:
                        continue
                    r = await chat(client, url, model, tasks.messages(it), config, 1800)
                    rec = {"id": it.id, "task": it.task, "length": it.length, "config": config, **r,
                           "score": tasks.score(it, r["text"]) if r["ok"] else 0.0}
                    records.append(rec)
                    if out:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                    log(f"  [{len(records)}/{total}] {it.id} {config:20s} "
                        + (f"{rec['score']:.2f} {r['seconds']:5.1f}s {r['text'][:50]!r}" if r["ok"] else f"ERROR {r['error']}"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if out:
        out.close()
    return records


# ------------------------------------------------------------------------------ statistics

def paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its normal 95% interval."""
    n = len(diffs)
    if n == 0:
        return 0.0, 0.0, 0.0
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return m, m - half, m + half


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(records: list[dict], metrics: dict, configs: list[str], tokenizer) -> list[dict]:
    """One row per configuration (``records`` of the evaluation items)."""
    by = {(r["id"], r["config"]): r for r in records}
    ids = sorted({r["id"] for r in records})
    cells = sorted({(r["task"], r["length"]) for r in records})
    toks = {}

    def tokens(r):
        if r["id"] + r["config"] not in toks:
            toks[r["id"] + r["config"]] = tokenizer.encode(r.get("text") or "")
        return toks[r["id"] + r["config"]]

    rows = []
    for c in configs:
        recs = [by[(i, c)] for i in ids if (i, c) in by]
        if not recs:
            continue
        base = [(r, by.get((r["id"], "none"))) for r in recs]
        base = [(r, b) for r, b in base if b is not None and b["ok"] and r["ok"]]
        scores = [r["score"] for r in recs]
        k = sum(scores)
        row: dict[str, Any] = {"config": c, "n": len(recs), "errors": sum(not r["ok"] for r in recs),
                               "accuracy": k / len(recs), "wilson": wilson(round(k), len(recs))}
        row["cells"] = {}
        for task, length in cells:
            sub = [r["score"] for r in recs if r["task"] == task and r["length"] == length]
            if sub:
                row["cells"][f"{task}@{length}"] = [sum(sub) / len(sub), len(sub)]
        row["loss"] = paired([b["score"] - r["score"] for r, b in base])  # positive = worse than none
        row["lost"] = sum(b["score"] > r["score"] for r, b in base)
        row["gained"] = sum(b["score"] < r["score"] for r, b in base)
        row["agree"] = sum(r["text"] == b["text"] for r, b in base) / max(1, len(base))
        row["prefix_tokens"] = sum(common_prefix(tokens(r), tokens(b)) for r, b in base) / max(1, len(base))
        wire, full = metrics["wire"].get(c, 0.0), metrics["full_16bit"].get(c, 0.0)
        row["wire_bytes"], row["full_16bit_bytes"] = wire, full
        row["ratio"] = full / wire if wire else None
        n_kept = metrics["kept_count"].get(c, 0.0)
        row["kept"] = metrics["kept_sum"].get(c, 0.0) / n_kept if n_kept else None
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ report

def _pct(x, d=1):
    return "-" if x is None else f"{100 * x:.{d}f}"


def table(rows: list[dict], ref: list[dict] | None = None) -> list[str]:
    cells = sorted({k for r in rows for k in r["cells"]}, key=lambda s: (s.split("@")[0], int(s.split("@")[1])))
    head = ["config", "bytes vs 16-bit", "kept", "n", "accuracy % (95% CI)", "loss vs none, pts (95% CI)",
            "lost / gained", "greedy = none", "common prefix (tok)", *cells]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lo, hi = r["wilson"]
        m, a, b = r["loss"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        out.append("| " + " | ".join([
            f"`{r['config']}`", ratio, _pct(r["kept"], 0), str(r["n"]) + (f" ({r['errors']} err)" if r["errors"] else ""),
            f"{_pct(r['accuracy'])} ({_pct(lo, 0)}-{_pct(hi, 0)})",
            "-" if r["config"] == "none" else f"{100 * m:+.1f} ({100 * a:+.1f}, {100 * b:+.1f})",
            "-" if r["config"] == "none" else f"{r['lost']} / {r['gained']}",
            "-" if r["config"] == "none" else _pct(r["agree"], 0) + "%",
            "-" if r["config"] == "none" else f"{r['prefix_tokens']:.1f}",
            *[("-" if k not in r["cells"] else f"{_pct(r['cells'][k][0], 0)}") for k in cells],
        ]) + " |")
    return out


def plot(res: dict, path: Path) -> None:
    plt = pyplot()

    rows = [r for r in res["rows"] if r["ratio"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        kind = "o" if r["config"] in BUILT_IN else ("s" if "learned" not in r["config"] else "D")
        ax.errorbar(r["ratio"], 100 * r["accuracy"], fmt=kind, capsize=2,
                    yerr=[[100 * (r["accuracy"] - r["wilson"][0])], [100 * (r["wilson"][1] - r["accuracy"])]])
        ax.annotate(r["config"], (r["ratio"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in res.get("kvpress", {}).get("rows", []):
        if r.get("ratio"):
            ax.plot(r["ratio"], 100 * r["accuracy"], "x", color="black")
            ax.annotate(f"{r['config']} (n={r['n']})", (r["ratio"], 100 * r["accuracy"]), fontsize=6, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes vs 16-bit KV (x fewer; log2)")
    ax.set_ylabel("accuracy, evaluation items (%); x: kvpress, its own items")
    ax.set_title(f"kvrelay KV compression on SmolLM2-135M, RULER tasks (n={rows[0]['n'] if rows else 0})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(res: dict, stem: Path) -> None:
    md = stem.with_suffix(".md")
    m = res["meta"]
    lines = [
        "# Compression quality: RULER tasks through the serving path", "",
        "Written by `python -m bench.quality.suite` (bench/quality/suite.py; the method is its docstring).", "",
        "| | |", "|---|---|",
        f"| date | {m['date']} |", f"| command | `{m['command']}` |", f"| commit | {m['git_commit']} |",
        f"| machine | {m['cpu']}, {m['cpu_count']} cores; Python {m['python']}, torch {m['torch']} |",
        f"| server | `kvrelay serve {' '.join(res['server_args'])}` + the config below |",
        f"| items | {res['items_summary']} |",
        f"| learned profile | `{res['profile']}` |", f"| run time | {m['run_s']:.0f} s |",
        *([f"| names | {res['relabel']} |"] if res.get("relabel") else []), "",
        "## Results", "",
        *table(res["rows"]), "",
        "Bytes: the prefill worker's wire bytes of each configuration over the 16-bit size of the KV it "
        "would ship uncompressed (the same tokens), from its Prometheus counters. Loss: accuracy of `none` "
        "minus the configuration's, per item, averaged (positive = worse). Cells: accuracy % per task@length.", "",
    ]
    if res.get("kvpress"):
        lines += ["## kvpress reference (same items, HF transformers, its own venv)", "", *res["kvpress"]["table"], ""]
    lines += [f"![pareto]({stem.name}.png)", "", *reading_section(md)]
    md.write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, stem.with_suffix(".png"))


def meta(argv, t0: float) -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench.quality.suite " + shlex.join(argv), "git_commit": commit + (" (dirty)" if dirty else ""),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "run_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.quality.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 items per task at 1k, 3 configs; prints only")
    p.add_argument("--items", default="1024:10,2048:6,4096:2", help="items per task per length, LEN:N,...")
    p.add_argument("--arith", type=int, default=20, help="arithmetic items")
    p.add_argument("--tasks", nargs="*", default=None, help="default: every task of bench/quality/tasks.py")
    p.add_argument("--configs", nargs="*", default=None, help="default: the built-in presets and the sweep")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=str(PROFILE))
    p.add_argument("--out", default=None, help="output stem (default bench/results/quality; --quick: none)")
    p.add_argument("--records", default=None, help="JSONL of every request (resumable: done pairs are skipped)")
    p.add_argument("--kvpress", default=None, help="kvpress predictions JSONL to score and add (bench/quality/kvpress_env.py)")
    p.add_argument("--render", default=None, help="re-render a results .json")
    return p.parse_args(argv)


def eval_items(args) -> list:
    from bench.quality import tasks

    task_list = args.tasks or [t for t in tasks.TASKS if t != "arith"]
    plan = {1024: 2} if args.quick else {int(a): int(b) for a, b in (x.split(":") for x in args.items.split(","))}
    items = []
    for length, n in plan.items():
        for t in task_list:
            if t != "arith":
                items += tasks.generate(t, length, n, "evaluation", seed=args.seed)
    n_arith = 2 if args.quick else args.arith
    if (args.tasks is None or "arith" in args.tasks) and n_arith:
        items += tasks.generate("arith", 512, n_arith, "evaluation", seed=args.seed)
    return items


def run(args, argv) -> dict[str, Any]:
    import httpx

    from bench.loadgen import scrape
    from router.tokenizer import load_tokenizer
    from workers.loader import resolve_model

    t0 = time.perf_counter()
    configs = order_configs(args.configs or (QUICK_CONFIGS if args.quick else BUILT_IN + list(SWEEP)))
    items = eval_items(args)
    log(f"{len(items)} items x {len(configs)} configs: {configs}")
    cfg_file = Path(tempfile.mkstemp(prefix="kvrelay-quality-", suffix=".yaml")[1])
    cfg_file.write_text(yaml.safe_dump(server_config(configs, Path(args.profile))))
    serve_args = ["--prefill-workers", "1", "--decode-workers", "1", "--threads", "1", "--config", str(cfg_file)]
    for k, v in {**{f"engine.{k}": v for k, v in SERVER_ENGINE.items()},
                 **{f"deadlines.{k}": v for k, v in SERVER_DEADLINES.items()}}.items():
        serve_args += ["--set", f"{k}={v}"]
    records_path = Path(args.records) if args.records else None
    old = [json.loads(x) for x in records_path.read_text().splitlines() if x.strip()] if records_path and records_path.exists() else []
    old = [r for r in old if r["ok"]]
    done = {(r["id"], r["config"]) for r in old}
    with Server("quality", serve_args, startup_timeout_s=600) as server:
        model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]

        async def go():
            before = await scrape(server.url)
            recs = await run_jobs(server.url, model, [Job(it, configs) for it in items], args.concurrency, records_path, done)
            return recs, metric_deltas(before, await scrape(server.url))

        records, metrics = asyncio.run(go())
    records = old + records
    tok = load_tokenizer(resolve_model("default"))
    rows = summarize(records, metrics, configs, tok)
    by_cell: dict[str, int] = {}
    for it in items:
        by_cell[f"{it.task}@{it.length}"] = by_cell.get(f"{it.task}@{it.length}", 0) + 1
    res = {"args": vars(args), "rows": rows, "metrics": metrics, "configs": configs, "sweep": SWEEP, "server_args": serve_args,
           "server_config": server_config(configs, Path(args.profile)), "profile": args.profile,
           "items_summary": f"{len(items)} evaluation items: " + ", ".join(f"{k} {v}" for k, v in by_cell.items()),
           "records": records}
    res["meta"] = meta(argv, t0)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        if args.kvpress:
            from bench.quality.reference import score_kvpress

            res["kvpress"] = score_kvpress(Path(args.kvpress), res)
        render(res, Path(args.render).with_suffix(""))
    else:
        res = run(args, argv)
        out = args.out or (None if args.quick else str(RESULTS / "quality"))
        if out:
            render(res, Path(out))
    print("\n".join(table(res["rows"])))
    errors = sum(r["errors"] for r in res["rows"])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
