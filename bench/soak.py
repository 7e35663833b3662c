"""Soak: a live ``kvrelay serve`` under steady load at this machine's measured capacity
for ``--duration`` seconds (default 10 minutes).

    python -m bench.soak                       # calibrate, then 600 s at capacity
    python -m bench.soak --concurrency 4       # skip the calibration

Load: closed-loop streaming chat sessions (bench/loadgen.py), each a conversation of up
to 4 turns (its earlier turns and answers in the prompt: prefix-cache hits), then a new
one; greedy and sampled (temperature 0.7) turns mixed; ``max_tokens`` 32. *Capacity*:
short runs at 1, 2, 4 and 8 concurrent sessions; the smallest concurrency whose output
throughput is within 10% of the best is the load the machine sustains without just
queueing more. Reported: errors and hung requests (none allowed), the resident memory
of the router and every worker (their own ``process_resident_memory_bytes``) every
30 s and its growth, and TTFT / ITL / end-to-end p50 and p99 per minute, plotted.
Writes ``bench/results/soak{tag}.md`` / ``.json`` / ``.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

from bench.loadgen import SLO, RequestRecord, RequestSpec, Session, run_load_sync, summarize
from bench.report import dist, loadavg, machine_info, md_table, pyplot, reading_section
from bench.server import Server, log, process_rss
from bench.workloads import words

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "SmolLM2-135M-Instruct"
TURNS = 4
QUESTIONS = ["Summarize it in one sentence.", "Name one object it mentions.", "Suggest a title.",
             "Is the tone calm or busy? One word."]


def session(i: int, seed: int) -> Session:
    """Conversations of up to TURNS turns, one after another, forever."""
    rng = random.Random(seed * 1000 + i)
    state = {"messages": [], "turn": 0}

    def next_turn(history: list[RequestRecord]) -> RequestSpec:
        if history and history[-1].ok and state["turn"]:
            state["messages"].append({"role": "assistant", "content": history[-1].text})
        if state["turn"] == TURNS or not state["messages"]:
            state["messages"] = [{"role": "user", "content": f"Session {i}. Read this: {words(rng, rng.randint(40, 160))}"}]
            state["turn"] = 0
        else:
            state["messages"].append({"role": "user", "content": rng.choice(QUESTIONS)})
        state["turn"] += 1
        temperature = rng.choice([0.0, 0.0, 0.7])
        body = {"messages": list(state["messages"]), "max_tokens": 32, "temperature": temperature,
                **({"seed": rng.randint(0, 10**6)} if temperature else {})}
        return RequestSpec("chat", body, {"turn": state["turn"]})

    return Session(f"s{i}", start_s=0.05 * i, turns=next_turn, stop_on_error=False)


def load(url: str, concurrency: int, duration_s: float, seed: int, timeout_s: float) -> tuple[list[RequestRecord], float]:
    records, timing = run_load_sync(url, MODEL, [session(i, seed) for i in range(concurrency)],
                                    max_requests=10**6, duration_s=duration_s, request_timeout_s=timeout_s)
    return records, timing["wall_s"]


def calibrate(url: str, seconds: float, seed: int) -> tuple[int, list[dict]]:
    rows = []
    for c in (1, 2, 4, 8):
        recs, _ = load(url, c, seconds, seed + 100 + c, 120.0)
        s = summarize(recs, SLO())
        rows.append({"concurrency": c, "ok": s["ok"], "errors": s["errors"], "output_tok_per_s": s["output_tok_per_s"],
                     "requests_per_s": s["requests_per_s"], "ttft_p50_s": s["ttft_s"]["p50"], "e2e_p50_s": s["e2e_s"]["p50"]})
        log(f"calibration: {c} sessions -> {s['output_tok_per_s']:.1f} out tok/s, {s['requests_per_s']:.2f} req/s, "
            f"e2e p50 {s['e2e_s']['p50']:.2f}s")
    best = max(r["output_tok_per_s"] or 0 for r in rows)
    chosen = min(r["concurrency"] for r in rows if (r["output_tok_per_s"] or 0) >= 0.9 * best)
    return chosen, rows


def run(args) -> dict:
    with Server("soak", ["--set", "engine.max_model_len=4096"]) as srv:
        url = srv.url
        chosen, calib = (args.concurrency, []) if args.concurrency else calibrate(url, args.calibrate_s, args.seed)
        log(f"soak: {chosen} sessions for {args.duration:.0f}s")
        rss: list[tuple[float, dict[str, float]]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                try:
                    rss.append((time.monotonic() - t0, process_rss(url)))
                except Exception as e:  # noqa: BLE001
                    log(f"RSS sample failed: {e}")
                stop.wait(args.rss_every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        records, wall = load(url, chosen, args.duration, args.seed, args.timeout)
        stop.set()
        sampler.join(30)
        rss.append((time.monotonic() - t0, process_rss(url)))
        healthy, health = srv.healthy()
    summary = summarize(records, SLO())
    hung = sum(1 for r in records if not r.ok and r.error and ("cancelled" in r.error or "imeout" in r.error))
    windows = []
    for m in range(int(args.duration // 60) + 1):
        w = [r for r in records if r.ok and m * 60 <= r.sent_s < (m + 1) * 60]
        if w:
            windows.append({"minute": m, "requests": len(w), "ttft_s": dist([r.ttft_s for r in w]),
                            "itl_s": dist([g for r in w for g in r.itl_s]), "e2e_s": dist([r.e2e_s for r in w])})
    names = sorted({n for _, d in rss for n in d})
    growth = {}
    for n in names:
        series = [(t, d[n]) for t, d in rss if n in d]
        first = series[1] if len(series) > 2 else series[0]  # the first sample after the warm-up of the load
        growth[n] = {"first_mib": round(first[1] / 2**20, 1), "last_mib": round(series[-1][1] / 2**20, 1),
                     "max_mib": round(max(v for _, v in series) / 2**20, 1),
                     "growth_mib": round((series[-1][1] - first[1]) / 2**20, 1)}
    return {"duration_s": args.duration, "concurrency": chosen, "calibration": calib, "wall_s": wall,
            "summary": summary, "hung": hung, "healthy_after": healthy, "health_after": health,
            "windows": windows, "rss": [(t, {k: round(v / 2**20, 1) for k, v in d.items()}) for t, d in rss],
            "rss_growth": growth, "machine": machine_info(), "load_average": loadavg(),
            "records": [r.to_json() for r in records]}


def pools(res: dict) -> str:
    """The served pools, as their processes answered the RSS samples: "2 prefill + 1 decode workers"."""
    names = list(res["rss_growth"])
    count = {role: sum(1 for n in names if n.startswith(f"{role}-")) for role in ("prefill", "decode", "colocated")}
    return " + ".join(f"{n} {role}" for role, n in count.items() if n) + " workers"


def write(res: dict, tag: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"soak{tag}.json").write_text(json.dumps(res, indent=2))
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    mins = [w["minute"] + 0.5 for w in res["windows"]]
    for key, label, style in (("ttft_s", "TTFT", "o-"), ("itl_s", "ITL", "s-"), ("e2e_s", "end to end", "^-")):
        a.plot(mins, [w[key]["p99"] for w in res["windows"]], style, label=f"{label} p99")
        a.plot(mins, [w[key]["p50"] for w in res["windows"]], style, alpha=0.35, label=f"{label} p50")
    a.set_yscale("log")
    a.set_xlabel("minute of the run")
    a.set_ylabel("seconds (log)")
    a.set_title(f"latency per minute, {res['concurrency']} sessions")
    a.legend(fontsize=7, ncol=2)
    for name in sorted(res["rss_growth"]):
        pts = [(t / 60, d[name]) for t, d in res["rss"] if name in d]
        base = res["rss_growth"][name]["first_mib"]
        b.plot([p[0] for p in pts], [p[1] - base for p in pts], "o-", ms=3, label=f"{name} (first {base:.0f} MiB)")
    b.axhline(0, color="gray", lw=0.5)
    b.set_xlabel("minute of the run")
    b.set_ylabel("RSS minus its first sample after the load began (MiB)")
    b.set_title("resident memory growth per process")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"soak{tag}.png", dpi=110)
    s = res["summary"]

    def ms(d, k):
        return "-" if d.get(k) is None else f"{d[k] * 1000:.0f}"

    rows = [("requests", s["requests"]), ("ok", s["ok"]), ("errors", s["errors"]), ("hung", res["hung"]),
            ("healthy after", res["healthy_after"]),
            ("throughput: output tok/s, req/s", f"{s['output_tok_per_s']:.1f}, {s['requests_per_s']:.2f}"),
            ("TTFT p50 / p99 (ms)", f"{ms(s['ttft_s'], 'p50')} / {ms(s['ttft_s'], 'p99')}"),
            ("ITL p50 / p99 (ms)", f"{ms(s['itl_s'], 'p50')} / {ms(s['itl_s'], 'p99')}"),
            ("end to end p50 / p99 (ms)", f"{ms(s['e2e_s'], 'p50')} / {ms(s['e2e_s'], 'p99')}"),
            ("prompt tokens reported cached", f"{s['cached_tokens_reported']} of {s['prompt_tokens']}")]
    def under_load(name: str) -> float:
        """The last sample taken while the load ran (the run's last one is taken after it)."""
        series = [d[name] for _, d in res["rss"] if name in d]
        return series[-2] if len(series) > 2 else series[-1]

    rss_rows = [(n, g["first_mib"], under_load(n), f"{under_load(n) - g['first_mib']:.1f}", g["last_mib"], g["max_mib"],
                 g["growth_mib"]) for n, g in sorted(res["rss_growth"].items())]
    win_rows = [(w["minute"], w["requests"], ms(w["ttft_s"], "p50"), ms(w["ttft_s"], "p99"), ms(w["itl_s"], "p99"),
                 ms(w["e2e_s"], "p99")) for w in res["windows"]]
    calib = [(c["concurrency"], c["ok"], c["errors"], f"{c['output_tok_per_s']:.1f}", f"{c['requests_per_s']:.2f}",
              f"{c['e2e_p50_s']:.2f}") for c in res["calibration"]]
    mi = res["machine"]
    cmd = f"python -m bench.soak --duration {res['duration_s']:.0f}"
    if not res["calibration"]:
        cmd += f" --concurrency {res['concurrency']}"
    md = [f"# Soak{(' ' + tag.strip('-')) if tag else ''}", "",
          f"`{cmd}`: `kvrelay serve` ({pools(res)} over "
          f"UCX, SmolLM2, defaults otherwise) under {res['concurrency']} closed-loop streaming chat sessions (up to "
          f"{TURNS} turns each, then a new conversation; greedy and sampled; max_tokens 32) for "
          f"{res['duration_s'] / 60:.0f} minutes. {mi['cpu']}, {mi['logical_cpus']} CPUs, commit {mi['git_commit']}; "
          f"load average at the end {res['load_average']}.", "",
          *md_table(["what", "value"], rows, "lr"), "",
          "Capacity (short calibration runs before the soak; the smallest concurrency within 10% of the best output "
          "throughput is the soak's load):", "",
          *(md_table(["sessions", "ok", "errors", "out tok/s", "req/s", "e2e p50 (s)"], calib, "rrrrrr") if calib
            else ["(given with --concurrency)"]), "",
          "Resident memory (MiB; first = the first sample after the load began; last under load = the last sample "
          "while it ran; after = once it ended):", "",
          *md_table(["process", "first", "last under load", "growth under load", "after", "max", "growth after"],
                    rss_rows, "lrrrrrr"), "",
          "Per minute (ms):", "",
          *md_table(["minute", "requests", "TTFT p50", "TTFT p99", "ITL p99", "e2e p99"], win_rows, "rrrrrr"), "",
          f"![soak](soak{tag}.png)", "", *reading_section(RESULTS / f"soak{tag}.md")]
    path = RESULTS / f"soak{tag}.md"
    path.write_text("\n".join(md))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load at capacity")
    ap.add_argument("--concurrency", type=int, default=0, help="sessions (0: calibrate first)")
    ap.add_argument("--calibrate-s", type=float, default=40.0, help="seconds per calibration step")
    ap.add_argument("--rss-every", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s): later is hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    res = run(args)
    path = write(res, args.tag)
    print(path.read_text())
    return 0 if res["summary"]["errors"] == 0 and res["hung"] == 0 and res["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
