"""Overload: many concurrent clients at once against a live ``kvrelay serve`` whose
router admits at most ``router.max_inflight`` requests.

    python -m bench.overload                          # 1,000 clients vs max_inflight 256
    python -m bench.overload --clients 300 --max-inflight 64 --tag -small

Every client sends one short completion (``max_tokens`` 1) at the same moment over its
own HTTP connection (httpx, asyncio). Checked: the excess gets 429 with a
``Retry-After`` header in OpenAI's envelope; every admitted request completes (200); no
other status, no connection error; the router's resident memory (its own
``process_resident_memory_bytes``) before, at its peak during the burst and after; the
server answers normally right after (health 200, sequential requests 200). Writes
``bench/results/overload{tag}.md`` / ``.json`` / ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.report import dist, loadavg, machine_info, md_table, pyplot, reading_section
from bench.server import Server, log, process_rss

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "SmolLM2-135M-Instruct"


async def _one(client: httpx.AsyncClient, i: int, start: asyncio.Event, t0: float) -> dict:
    await start.wait()
    sent = time.monotonic() - t0
    body = {"model": MODEL, "prompt": f"Client {i} says hello.", "max_tokens": 1, "temperature": 0}
    try:
        r = await client.post("/v1/completions", json=body)
        err = r.json().get("error") if r.status_code != 200 else None
        return {"i": i, "status": r.status_code, "sent_s": sent, "done_s": time.monotonic() - t0,
                "retry_after": r.headers.get("retry-after"), "error_code": err and err.get("code"),
                "envelope": r.status_code == 200 or bool(err and err.get("message") and err.get("type"))}
    except httpx.HTTPError as e:
        return {"i": i, "status": f"exception: {type(e).__name__}", "sent_s": sent, "done_s": time.monotonic() - t0,
                "retry_after": None, "error_code": None, "envelope": False}


async def burst(url: str, clients: int, timeout_s: float) -> tuple[list[dict], list[tuple[float, float]]]:
    """Every client at once; the router's RSS sampled every 0.25 s meanwhile."""
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    start = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client, \
            httpx.AsyncClient(base_url=url, timeout=10) as probe:
        tasks = [asyncio.create_task(_one(client, i, start, t0)) for i in range(clients)]

        async def sample() -> None:
            while True:
                try:
                    text = (await probe.get("/metrics")).text
                    v = next(float(line.split()[-1]) for line in text.splitlines()
                             if line.startswith("process_resident_memory_bytes"))
                    rss.append((time.monotonic() - t0, v))
                except (httpx.HTTPError, StopIteration):
                    pass
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        await asyncio.sleep(0.5)  # every task is waiting at the start line
        start.set()
        records = await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + 60)
        await asyncio.sleep(1.0)
        sampler.cancel()
    return list(records), rss


def after(url: str, n: int = 8) -> dict:
    """Right after the burst: health and ``n`` sequential ordinary requests."""
    statuses, seconds = [], []
    h = httpx.get(f"{url}/health", timeout=30).status_code
    for i in range(n):
        t = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", timeout=120,
                       json={"model": MODEL, "prompt": f"After the storm, request {i}:", "max_tokens": 8, "temperature": 0})
        statuses.append(r.status_code)
        seconds.append(time.monotonic() - t)
    return {"health": h, "statuses": statuses, "seconds": dist(seconds)}


def run(args) -> dict:
    server_args = ["--set", f"router.max_inflight={args.max_inflight}", "--set", "engine.max_model_len=2048",
                   "--set", f"engine.kv_cache_memory_gb={args.kv_gb}"]
    with Server("overload", server_args) as srv:
        url = srv.url
        warm = httpx.post(f"{url}/v1/completions", timeout=120, json={"model": MODEL, "prompt": "warm up", "max_tokens": 2})
        assert warm.status_code == 200, warm.text
        rss_before = process_rss(url)
        log(f"{args.clients} clients at once against max_inflight {args.max_inflight}")
        t = time.monotonic()
        records, rss_samples = asyncio.run(burst(url, args.clients, args.timeout))
        burst_s = time.monotonic() - t
        time.sleep(2.0)
        rss_after = process_rss(url)
        normal = after(url)
        rss_end = process_rss(url)
        # Further bursts: memory that grows by the same amount each time is a leak;
        # memory that stays where the first burst left it is the allocator's high-water mark.
        repeats = []
        for k in range(1, args.bursts):
            recs, _ = asyncio.run(burst(url, args.clients, args.timeout))
            time.sleep(2.0)
            repeats.append({"statuses": dict(Counter(str(r["status"]) for r in recs)),
                            "router_rss_mib_after": _mib(process_rss(url).get("router"))})
            log(f"burst {k + 1}: {repeats[-1]}")
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    statuses = Counter(str(r["status"]) for r in records)
    limited = [r for r in records if r["status"] == 429]
    ok = [r for r in records if r["status"] == 200]
    return {
        "clients": args.clients, "max_inflight": args.max_inflight, "kv_cache_memory_gb": args.kv_gb,
        "burst_s": round(burst_s, 2), "statuses": dict(statuses),
        "rate_limited_with_retry_after": sum(1 for r in limited if r["retry_after"]),
        "rate_limited_codes": dict(Counter(r["error_code"] for r in limited)),
        "errors_in_openai_envelope": sum(1 for r in records if r["status"] != 200 and r["envelope"]),
        "ok_latency_s": dist([r["done_s"] - r["sent_s"] for r in ok]),
        "limited_latency_s": dist([r["done_s"] - r["sent_s"] for r in limited]),
        "router_rss_mib": {"before": _mib(rss_before.get("router")),
                           "peak_during": _mib(max((v for _, v in rss_samples), default=None)),
                           "after": _mib(rss_after.get("router")), "end": _mib(rss_end.get("router"))},
        "worker_rss_mib": {w: [_mib(rss_before.get(w)), _mib(rss_after.get(w))] for w in sorted(rss_before) if w != "router"},
        "after": normal, "repeated_bursts": repeats,
        "router_rate_limited_total": next((float(line.split()[-1]) for line in metrics.splitlines()
                                           if line.startswith('kvrelay_requests_total{status="rate_limited"}')), None),
        "records": records, "rss_samples": rss_samples,
        "machine": machine_info(), "load_average": loadavg(),
    }


def _mib(v: float | None) -> float | None:
    return None if v is None else round(v / 2**20, 1)


def write(res: dict, tag: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"overload{tag}.json").write_text(json.dumps(res, indent=2))
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for status, color in (("200", "tab:green"), ("429", "tab:orange")):
        rs = sorted((r for r in res["records"] if str(r["status"]) == status), key=lambda r: r["done_s"])
        a.scatter([r["done_s"] for r in rs], range(len(rs)), s=4, color=color, label=f"{status} ({len(rs)})")
    other = [r for r in res["records"] if str(r["status"]) not in ("200", "429")]
    if other:
        a.scatter([r["done_s"] for r in other], range(len(other)), s=8, color="tab:red", label=f"other ({len(other)})")
    a.set_xlabel("seconds since the burst started")
    a.set_ylabel("responses, in order of arrival")
    a.set_title(f"{res['clients']} clients vs max_inflight {res['max_inflight']}")
    a.legend()
    b.plot([t for t, _ in res["rss_samples"]], [v / 2**20 for _, v in res["rss_samples"]], color="tab:blue")
    b.set_xlabel("seconds since the burst started")
    b.set_ylabel("router RSS (MiB)")
    b.set_title("router resident memory during the burst")
    fig.tight_layout()
    fig.savefig(RESULTS / f"overload{tag}.png", dpi=110)
    s, m = res["statuses"], res["router_rss_mib"]
    rows = [("clients (at once)", res["clients"]), ("router.max_inflight", res["max_inflight"]),
            ("200 (admitted, completed)", s.get("200", 0)), ("429 (rate limited)", s.get("429", 0)),
            ("  of them with Retry-After", res["rate_limited_with_retry_after"]),
            ("other statuses or connection errors", sum(n for k, n in s.items() if k not in ("200", "429"))),
            ("errors in OpenAI's envelope", f"{res['errors_in_openai_envelope']} of {res['clients'] - s.get('200', 0)}"),
            ("router's kvrelay_requests_total{status=rate_limited}, after all bursts", res["router_rate_limited_total"]),
            ("burst wall time (s)", res["burst_s"]),
            ("200 latency p50 / p99 / max (s)", _dist(res["ok_latency_s"])),
            ("429 latency p50 / p99 / max (s)", _dist(res["limited_latency_s"])),
            ("router RSS before / peak during / after / end (MiB)", f"{m['before']} / {m['peak_during']} / {m['after']} / {m['end']}"),
            ("worker RSS before -> after (MiB)", "; ".join(f"{w} {x} -> {y}" for w, (x, y) in res["worker_rss_mib"].items())),
            ("right after: health, 8 sequential requests", f"{res['after']['health']}, {dict(Counter(res['after']['statuses']))}"),
            ("right after: request latency p50 / max (s)", f"{res['after']['seconds']['p50']:.2f} / {res['after']['seconds']['max']:.2f}"),
            *((f"burst {k + 2}: statuses, router RSS after (MiB)", f"{b['statuses']}, {b['router_rss_mib_after']}")
              for k, b in enumerate(res.get("repeated_bursts", [])))]
    mi = res["machine"]
    md = [f"# Overload{(' ' + tag.strip('-')) if tag else ''}", "",
          f"`python -m bench.overload --clients {res['clients']} --max-inflight {res['max_inflight']}"
          f"{'' if len(res.get('repeated_bursts', [])) == 2 else ' --bursts %d' % (1 + len(res.get('repeated_bursts', [])))}"
          f"{' --tag=' + tag if tag else ''}`: `kvrelay serve` "
          f"({workers(res)} over UCX, SmolLM2, KV {res['kv_cache_memory_gb']} GB per worker), every client "
          "one `/v1/completions` with a short prompt and `max_tokens` 1, all released at once. "
          f"{mi['cpu']}, {mi['logical_cpus']} CPUs, commit {mi['git_commit']}; load average after {res['load_average']}.", "",
          *md_table(["what", "value"], rows, "lr"), "", f"![overload](overload{tag}.png)", "",
          *reading_section(RESULTS / f"overload{tag}.md")]
    path = RESULTS / f"overload{tag}.md"
    path.write_text("\n".join(md))
    return path


def workers(res: dict) -> str:
    """The served pools, from the workers that answered: "2 prefill + 1 decode workers"."""
    names = list(res["worker_rss_mib"])
    count = {role: sum(1 for n in names if n.startswith(f"{role}-")) for role in ("prefill", "decode", "colocated")}
    return " + ".join(f"{n} {role}" for role, n in count.items() if n) + " workers"


def _dist(d: dict) -> str:
    if not d["n"]:
        return "-"
    return f"{d['p50']:.2f} / {d['p99']:.2f} / {d['max']:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--max-inflight", type=int, default=256)
    ap.add_argument("--kv-gb", type=float, default=0.25, help="KV cache per worker (GB)")
    ap.add_argument("--timeout", type=float, default=180.0, help="per-request client timeout (s)")
    ap.add_argument("--bursts", type=int, default=3, help="bursts in a row (RSS after each: leak or high-water mark)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    res = run(args)
    path = write(res, args.tag)
    print(path.read_text())
    s = res["statuses"]
    good = (set(s) <= {"200", "429"} and all(set(b["statuses"]) <= {"200", "429"} for b in res["repeated_bursts"]) and res["rate_limited_with_retry_after"] == s.get("429", 0)
            and res["after"]["health"] == 200 and set(res["after"]["statuses"]) == {200})
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
