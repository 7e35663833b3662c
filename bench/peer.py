"""kvrelay against vLLM's CPU build, side by side, measured by vLLM's own client.

    python -m bench.peer                         # every scenario, vLLM + kvrelay configs
    python -m bench.peer --scenarios c8 --systems vllm default   # a subset
    python -m bench.peer --render                # rewrite the table and plot from the json

The peer comes from ``../shared/tools/peer-vllm-setup.sh`` (its own venv outside the
repo, and the embedded GGUF written as a float32 safetensors directory). Each server runs
alone on the machine, one after the other; ``vllm bench serve`` (the same client, seeds
and datasets for every server) drives the chat endpoint of each. Results: per-run JSON of
the client under ``bench/results/peer/``, the table ``bench/results/peer.md`` and the plot
``bench/results/peer.png``. Ratios are kvrelay / vLLM from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.report import loadavg, machine_info, md_table, pyplot, reading_section
from bench.server import Server, free_port, log

PEER_VENV = Path(os.environ.get("PEER_VENV", Path.home() / ".cache/peer-vllm"))
PEER_MODEL = Path(os.environ.get("PEER_MODEL", Path.home() / ".cache/smollm2-135m-hf"))
SETUP = Path(__file__).resolve().parents[1].parent / "shared/tools/peer-vllm-setup.sh"

# name -> (what, vllm bench serve dataset arguments)
SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "c1": ("random 256 in / 64 out, concurrency 1, 8 prompts",
           ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64",
            "--num-prompts", "8", "--max-concurrency", "1"]),
    "c8": ("random 256 in / 64 out, concurrency 8, 48 prompts",
           ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64",
            "--num-prompts", "48", "--max-concurrency", "8"]),
    "c32": ("random 256 in / 64 out, concurrency 32, 64 prompts",
            ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64",
             "--num-prompts", "64", "--max-concurrency", "32"]),
    "prefix": ("prefix_repetition: 4 shared 512-token prefixes + 64-token suffixes, 64 out, concurrency 8, 48 prompts",
               ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "512",
                "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "4",
                "--prefix-repetition-output-len", "64", "--num-prompts", "48", "--max-concurrency", "8"]),
    "long": ("random 2,048 in / 64 out, concurrency 4, 12 prompts",
             ["--dataset-name", "random", "--random-input-len", "2048", "--random-output-len", "64",
              "--num-prompts", "12", "--max-concurrency", "4"]),
}

# name -> (what, kvrelay serve arguments); vllm is the peer
KVRELAY_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "default": ("`kvrelay serve` as shipped (on a 2-4 core CPU host: 2 prefill + 1 decode workers, float32)", []),
    "1p1d": ("1 prefill + 1 decode worker, 1 torch thread each, float32", ["--prefill-workers", "1", "--decode-workers", "1"]),
    "colocated": ("one colocated worker (prefill and decode in one engine) with 2 torch threads, float32",
                  ["--colocated", "--decode-workers", "1", "--threads", "2"]),
    "2p1d": ("2 prefill + 1 decode workers, 1 torch thread each (3 single-thread processes on the cores), float32",
             ["--prefill-workers", "2", "--decode-workers", "1", "--threads", "1"]),
    "gather": ("the default pools with `engine.decode_context_copies=false` (decode contexts gathered from the paged cache each step)",
               ["--set", "engine.decode_context_copies=false"]),
    "d2t": ("2 prefill workers with 1 torch thread each + 1 decode worker with 2 (OpenMP threads sleep at barriers), float32",
            ["--prefill-workers", "2", "--set", "pools.decode_threads=2"]),
    "p2t": ("1 prefill worker with 2 torch threads (OpenMP threads sleep at barriers) + 1 decode worker with 1, float32",
            ["--prefill-workers", "1", "--set", "pools.prefill_threads=2"]),
}
SYSTEMS = ["vllm", *KVRELAY_CONFIGS]
DEFAULT_SYSTEMS = ["vllm", "default"]
METRICS = ["ttft", "tpot", "itl", "e2el"]


def vllm_env() -> dict[str, str]:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class VllmServer(Server):
    """``vllm serve`` of the converted model, in the peer's venv."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__("vllm", [], startup_timeout_s=600.0, port=port)
        self.cmd = [str(PEER_VENV / "bin/vllm"), "serve", str(PEER_MODEL), "--served-model-name", "smollm2",
                    "--dtype", "float32", "--max-model-len", "4096", "--port", str(self.port)]

    def start(self) -> None:
        log(f"vllm: starting {' '.join(shlex.quote(c) for c in self.cmd)}")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=vllm_env(),
                                     start_new_session=True)
        self._wait_healthy(t0)


def ensure_peer() -> None:
    if not (PEER_VENV / "bin/vllm").exists() or not (PEER_MODEL / "model.safetensors").exists():
        log(f"installing the peer with {SETUP}")
        subprocess.run(["bash", str(SETUP), sys.executable], check=True)


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def drive(url: str, scenario: str, out: Path, seed: int) -> dict:
    """One ``vllm bench serve`` run; returns its result JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(PEER_VENV / "bin/vllm"), "bench", "serve", "--backend", "openai-chat", "--base-url", url,
           "--endpoint", "/v1/chat/completions", "--model", served_model(url), "--tokenizer", str(PEER_MODEL),
           *SCENARIOS[scenario][1], "--ignore-eos", "--temperature", "0", "--seed", str(seed),
           "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", "50,90,99",
           "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name, "--disable-tqdm"]
    log(f"{scenario}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["_wall_s"] = time.monotonic() - t0
    res["_command"] = " ".join(shlex.quote(c) for c in cmd[1:])
    return res


def profile_processes(url: str, out_dir: Path, duration_s: int) -> list[subprocess.Popen]:
    """Start ``py-spy record`` (flame graph SVG) on the router replica and every worker
    (their pids from the router's /health)."""
    import httpx

    health = httpx.get(f"{url}/health", timeout=10).json()
    targets = {"router": health["router_pid"], **{n: w["pid"] for n, w in health["workers"].items() if "pid" in w}}
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, pid in targets.items():
        svg = out_dir / f"{name}.svg"
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                       "--duration", str(duration_s), "--rate", "50", "--nonblocking",
                                       "--output", str(svg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        log(f"profiling {name} (pid {pid}) -> {svg}")
    return procs


# Counters read from kvrelay's /metrics before and after each scenario: where the router
# placed requests and what the prefix caches saved (the deltas go into peer.json).
PLACEMENT_COUNTERS = ("kvrelay_router_decisions_total", "kvrelay_prefill_computed_tokens_total",
                      "kvrelay_prefix_cache_hit_tokens_total", "kvrelay_prefix_cache_query_tokens_total",
                      "kvrelay_preemptions_total", "kvrelay_kv_recomputes_total")


def placement_counters(url: str) -> dict[str, float]:
    """``name[worker]`` -> value for :data:`PLACEMENT_COUNTERS`, from the router and every
    worker (``/metrics/targets``)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    targets = [t for g in httpx.get(f"{url}/metrics/targets", timeout=10).json() for t in g["targets"]]
    texts = [httpx.get(f"http://{t}/metrics", timeout=10).text for t in targets]
    for fam in (f for text in texts for f in text_string_to_metric_families(text)):
        for smp in fam.samples:
            if smp.name in PLACEMENT_COUNTERS:
                key = f"{smp.name.removeprefix('kvrelay_').removesuffix('_total')}[{smp.labels.get('worker', '')}]"
                out[key] = out.get(key, 0.0) + smp.value
    return out


def summary(res: dict) -> dict:
    s = {"output_tok_s": res.get("output_throughput"), "completed": res.get("completed"),
         "failed": res.get("failed", 0), "duration_s": res.get("duration")}
    for m in METRICS:
        for q in ("p50", "p90", "p99"):
            s[f"{m}_{q}_ms"] = res.get(f"{q}_{m}_ms")
        s[f"{m}_mean_ms"] = res.get(f"mean_{m}_ms")
    return s


def run(args: argparse.Namespace) -> dict:
    ensure_peer()
    out_dir = Path(args.out)
    raw = out_dir / "peer"
    data_path = out_dir / "peer.json"
    data = json.loads(data_path.read_text()) if data_path.exists() and args.merge else {"runs": {}}
    data["machine"] = machine_info()
    data["scenarios"] = {k: SCENARIOS[k][0] for k in SCENARIOS}
    data.setdefault("systems", {})
    for system in args.systems:
        if system == "vllm":
            server: Server = VllmServer()
            data["systems"]["vllm"] = {"what": "vLLM CPU build 0.32 (vllm-cpu), float32, default settings",
                                      "command": " ".join(server.cmd[1:])}
        else:
            what, extra = KVRELAY_CONFIGS[system]
            server = Server(system, [*extra, *args.kvrelay_args])
            data["systems"][system] = {"what": what, "command": "kvrelay " + " ".join(server.cmd[3:])}
        with server:
            data["systems"][system]["startup_s"] = server.startup_s
            for sc in args.scenarios:
                la0 = loadavg()
                spies = []
                if args.profile and system != "vllm" and sc == args.profile_scenario:
                    threading.Timer(args.profile_delay_s, lambda: spies.extend(
                        profile_processes(server.url, out_dir / "profiles" / system, args.profile_duration_s))).start()
                before = placement_counters(server.url) if system != "vllm" else {}
                res = drive(server.url, sc, raw / f"{system}-{sc}.json", args.seed)
                for spy in spies:
                    spy.wait(60)
                data["runs"].setdefault(sc, {})[system] = {**summary(res), "load_before": la0, "load_after": loadavg(),
                                                            "command": res["_command"]}
                if system != "vllm":
                    after = placement_counters(server.url)
                    data["runs"][sc][system]["placement"] = {k: v - before.get(k, 0.0) for k, v in sorted(after.items())
                                                             if v - before.get(k, 0.0)}
                    log(f"{system} {sc} placement: {data['runs'][sc][system]['placement']}")
                log(f"{system} {sc}: {data['runs'][sc][system]['output_tok_s']:.1f} tok/s")
                data_path.write_text(json.dumps(data, indent=1))
    data["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data_path.write_text(json.dumps(data, indent=1))
    return data


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def render(out_dir: Path) -> None:
    data = json.loads((out_dir / "peer.json").read_text())
    md = out_dir / "peer.md"
    keep = reading_section(md)
    systems = [s for s in data["systems"] if s != "vllm"]
    lines = ["# kvrelay vs vLLM's CPU build, side by side (measured by `vllm bench serve`)", "",
             "Reproduce: `python -m bench.peer` (installs the peer with `../shared/tools/peer-vllm-setup.sh` if missing)", ""]
    m = data["machine"]
    lines += md_table(["", ""], [["date", data.get("date", "")],
                                 ["machine", f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory']}"],
                                 ["software", f"python {m['python']}, torch {m['torch']}, ray {m['ray']}"],
                                 ["git", m["git_commit"]],
                                 ["client", "`vllm bench serve --backend openai-chat --endpoint /v1/chat/completions "
                                            "--ignore-eos --temperature 0 --seed 0` (same for every server)"]])
    lines += ["", "## Servers", ""]
    lines += md_table(["system", "what", "command", "start-up (s)"],
                      [[s, d["what"], f"`{d['command']}`", f"{d.get('startup_s') or 0:.0f}"]
                       for s, d in data["systems"].items()])
    lines += ["", "## Scenarios", ""]
    lines += [f"* **{k}**: {v}" for k, v in data["scenarios"].items()]
    lines += ["", "## Results", "", "Latencies in ms (p50 / p99); ratio = kvrelay / vLLM (below 1 is better for "
              "latencies, above 1 for tok/s).", ""]
    head = ["scenario", "system", "ok", "out tok/s", "tok/s ratio", "TTFT p50", "TTFT p99", "TTFT p50 ratio",
            "TPOT p50", "TPOT p50 ratio", "ITL p50", "ITL p99", "ITL p99 ratio", "E2E p50", "E2E p50 ratio",
            "load before/after"]
    rows = []
    for sc, runs in data["runs"].items():
        v = runs.get("vllm", {})
        for s in ["vllm", *systems]:
            r = runs.get(s)
            if r is None:
                continue
            base = s != "vllm"
            rows.append([sc, s, f"{r['completed']}/{r['completed'] + (r['failed'] or 0)}",
                         f"{r['output_tok_s']:.1f}", _ratio(r["output_tok_s"], v.get("output_tok_s")) if base else "",
                         _ms(r["ttft_p50_ms"]), _ms(r["ttft_p99_ms"]),
                         _ratio(r["ttft_p50_ms"], v.get("ttft_p50_ms")) if base else "",
                         _ms(r["tpot_p50_ms"]), _ratio(r["tpot_p50_ms"], v.get("tpot_p50_ms")) if base else "",
                         _ms(r["itl_p50_ms"]), _ms(r["itl_p99_ms"]),
                         _ratio(r["itl_p99_ms"], v.get("itl_p99_ms")) if base else "",
                         _ms(r["e2el_p50_ms"]), _ratio(r["e2el_p50_ms"], v.get("e2el_p50_ms")) if base else "",
                         f"{(r.get('load_before') or [0])[0]:.1f}/{(r.get('load_after') or [0])[0]:.1f}"])
    lines += md_table(head, rows)
    lines += ["", "![peer](peer.png)", ""]
    lines += keep
    md.write_text("\n".join(lines) + "\n")
    plot(data, out_dir / "peer.png")


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    scen = list(data["runs"])
    systems = [s for s in data["systems"] if s != "vllm"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title, lower) in zip(axes, [("output_tok_s", "output tok/s", False), ("ttft_p50_ms", "TTFT p50", True),
                                             ("itl_p99_ms", "ITL p99", True)]):
        width = 0.8 / max(len(systems), 1)
        for i, s in enumerate(systems):
            vals = []
            for sc in scen:
                a, b = data["runs"][sc].get(s, {}).get(key), data["runs"][sc].get("vllm", {}).get(key)
                vals.append(a / b if a and b else 0)
            ax.bar([j + i * width for j in range(len(scen))], vals, width, label=s)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scen))], scen)
        ax.set_title(f"{title}: kvrelay / vLLM ({'lower' if lower else 'higher'} is better)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=SYSTEMS,
                   help="servers to run, one after the other (default: vllm default)")
    p.add_argument("--kvrelay-args", default="", help="extra `kvrelay serve` arguments for every kvrelay system")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="py-spy flame graphs of the router replica and workers during --profile-scenario "
                        "(written to OUT/profiles/SYSTEM/)")
    p.add_argument("--profile-scenario", default="c8", choices=list(SCENARIOS))
    p.add_argument("--profile-delay-s", type=float, default=20.0, help="start profiling this long into the scenario")
    p.add_argument("--profile-duration-s", type=int, default=40)
    p.add_argument("--merge", action="store_true", help="keep the runs already in peer.json (replace the ones re-run)")
    p.add_argument("--render", action="store_true", help="only rewrite peer.md / peer.png from peer.json")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    args.kvrelay_args = shlex.split(args.kvrelay_args)
    if not args.render:
        run(args)
    render(Path(args.out))


if __name__ == "__main__":
    main()
