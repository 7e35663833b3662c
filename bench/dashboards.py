"""What the Grafana boards show, without Grafana: run `kvrelay serve` under a
multi-turn chat load, scrape it with a real Prometheus using deploy/prometheus/ as
shipped, then evaluate the key panels' own PromQL (read from deploy/grafana/*.json)
over the run and plot them with matplotlib.

    python -m bench.dashboards            # ~5 minutes; writes bench/results/dashboards.{png,md,json}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

from bench import workloads as W
from bench.report import cpu_name, pyplot, reading_section
from bench.loadgen import SLO, run_load, summarize
from bench.prometheus import GRAFANA_DIR, PrometheusServer, substitute, template_values
from bench.server import Server, log

MODEL = "SmolLM2-135M-Instruct"
RESULTS = Path(__file__).resolve().parent / "results"

# (dashboard uid, panel title): the panels plotted, in order.
PANELS: list[tuple[str, str]] = [
    ("kvrelay-overview", "Request rate by status"),
    ("kvrelay-overview", "Time to first token"),
    ("kvrelay-overview", "Inter-token latency"),
    ("kvrelay-kv-routing", "KV cache usage per worker"),
    ("kvrelay-kv-routing", "Prefix hit rate: predicted vs realized"),
    ("kvrelay-kv-routing", "Prefill tokens/s: computed vs saved"),
    ("kvrelay-kv-routing", "Placement decisions per worker"),
    ("kvrelay-transfer", "KV bytes: on the wire vs full"),
    ("kvrelay-transfer", "Compression ratio"),
]


# Grafana unit ids -> axis labels
UNITS = {"percentunit": "fraction", "Bps": "bytes/s", "reqps": "requests/s", "short": "per second", "s": "seconds",
         "suffix:x": "ratio (x)", "suffix:×": "ratio (x)", "ops": "per second", "none": ""}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill-workers", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.1, help="new conversations per second")
    p.add_argument("--duration", type=float, default=240.0, help="seconds of load at most")
    p.add_argument("--scrape-interval", type=float, default=2.0)
    p.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    p.add_argument("--out", default=str(RESULTS / "dashboards"))
    return p.parse_args(argv)


def panel_targets(uid: str, title: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        if board.get("uid") != uid:
            continue
        values = template_values(board)
        for panel in board.get("panels", []):
            if panel.get("title") == title:
                return panel, [t for t in panel.get("targets", []) if t.get("expr")], values
    raise KeyError(f"no panel {title!r} on dashboard {uid!r}")


def legend(fmt: str | None, labels: dict[str, str], expr: str) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or expr[:40]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def collect(prom: PrometheusServer, start: float, end: float, step_s: float, rate_interval: str) -> list[dict[str, Any]]:
    panels = []
    for uid, title in PANELS:
        panel, targets, values = panel_targets(uid, title)
        values.update({"__rate_interval": rate_interval, "__interval": f"{step_s:g}s", "__range": "30m"})
        series = []
        for t in targets:
            expr = substitute(t["expr"], values)
            answer = prom.query_range(expr, start, end, step_s)
            if answer.get("status") != "success":
                raise RuntimeError(f"{uid}/{title}: {answer.get('error')} in {expr}")
            for s in answer["data"]["result"]:
                pts = [(float(ts) - start, float(v)) for ts, v in s["values"]]
                series.append({"legend": legend(t.get("legendFormat"), s["metric"], expr), "points": pts, "expr": expr})
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        panels.append({"uid": uid, "title": title, "unit": unit, "series": series})
    return panels


def cross_check(prom: PrometheusServer, at: float, window_s: int) -> dict[str, Any]:
    """TTFT percentiles over the whole run from the server's histogram (what a board
    with a whole-run window shows), to set next to the load generator's own numbers."""
    out: dict[str, Any] = {"server": {}}
    for q in (0.5, 0.9, 0.99):
        expr = (f"histogram_quantile({q}, sum by (le) "
                f"(increase(kvrelay_time_to_first_token_seconds_bucket[{window_s}s])))")
        result = prom.query(expr, at)["data"]["result"]
        out["server"][f"p{round(q * 100)}"] = float(result[0]["value"][1]) if result else None
    return out


def render_plot(panels: list[dict[str, Any]], meta: dict[str, Any], path: str) -> None:
    plt = pyplot()

    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for s in p["series"]:
            xs = [x for x, y in s["points"] if y == y]  # NaN: no data in that window
            ys = [y for x, y in s["points"] if y == y]
            ax.plot(xs, ys, label=s["legend"], linewidth=1.4)
        ax.set_title(f"{p['title']}\n({p['uid']})", fontsize=9)
        ax.set_xlabel("seconds into the run", fontsize=8)
        if p["unit"]:
            ax.set_ylabel(UNITS.get(p["unit"], p["unit"]), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if p["series"]:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"kvrelay dashboards' key panels over a live run: {meta['config']}, multi-turn chat, "
                 f"SmolLM2-135M on {meta['cpu']} (python -m bench.dashboards)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(panels: list[dict[str, Any]], meta: dict[str, Any], summary: dict[str, Any]) -> str:
    L = ["# Dashboards' key panels from a live run", "",
         f"`python -m bench.dashboards` — {meta['config']}, {meta['workload']}, on {meta['cpu']}; "
         f"Prometheus scraping every {meta['scrape_interval_s']:g}s, `$__rate_interval` = {meta['rate_interval']}.", "",
         f"Load: {summary['requests']} requests, {summary.get('ok', '?')} ok. The PNG (`dashboards.png`) plots each panel's "
         "own PromQL from deploy/grafana/ over the run.", "",
         "| dashboard | panel | series | last value |", "|---|---|---|---|"]
    for p in panels:
        for s in p["series"]:
            last = next((y for _, y in reversed(s["points"]) if y == y), None)
            L.append(f"| {p['uid']} | {p['title']} | {s['legend']} | {'-' if last is None else f'{last:.4g}'} |")
    c = meta["ttft_cross_check"]
    L += ["", "TTFT over the whole run, the server's histogram (interpolated inside buckets) vs what the "
          "load generator measured (exact, client side; includes the HTTP round trip):", "",
          "| | p50 | p90 | p99 |", "|---|---|---|---|"]
    for who, label in (("server", "kvrelay_time_to_first_token_seconds"), ("client", "load generator")):
        L.append(f"| {label} | " + " | ".join("-" if c[who][k] is None else f"{c[who][k]:.3f} s" for k in ("p50", "p90", "p99")) + " |")
    return "\n".join(L) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    wl = W.multi_turn_chat(conversations=args.conversations, turns=args.turns, rate_per_s=args.rate)
    serve_args = ["--prefill-workers", str(args.prefill_workers), "--decode-workers", str(args.decode_workers),
                  "--set", "engine.kv_cache_memory_gb=0.25"]
    with Server("dashboards", serve_args) as kv, PrometheusServer(kv.url, args.scrape_interval, args.scrape_interval) as prom:
        prom.wait_for_targets(1 + args.prefill_workers + args.decode_workers)
        time.sleep(3 * args.scrape_interval)
        start = time.time()
        log(f"load: {wl.name}, {wl.num_requests} requests")
        records, timing = await run_load(kv.url, MODEL, wl.sessions, duration_s=args.duration, progress=log)
        time.sleep(4 * args.scrape_interval)
        end = time.time()
        panels = collect(prom, start, end, args.scrape_interval, args.rate_interval)
        whole_run = cross_check(prom, end, int(end - start) + 1)
    summary = summarize(records, SLO())
    whole_run["client"] = {q: summary["ttft_s"][q] for q in ("p50", "p90", "p99")}
    meta = {"config": f"{args.prefill_workers}P+{args.decode_workers}D, kv_aware", "workload": wl.description,
            "cpu": cpu_name(), "scrape_interval_s": args.scrape_interval, "rate_interval": args.rate_interval,
            "ttft_cross_check": whole_run}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_plot(panels, meta, str(out.with_suffix(".png")))
    out.with_suffix(".md").write_text(render_markdown(panels, meta, summary) + "\n" + "\n".join(reading_section(out.with_suffix(".md"))))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "panels": panels}, indent=1))
    log(f"wrote {out.with_suffix('.png')}, .md, .json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
