"""The ``kvrelay`` command line.

  kvrelay generate "prompt"     start the cluster on this machine (local Ray, one prefill
                                and one decode worker, KV over UCX), stream one answer
  kvrelay check-config FILE     validate a cluster config (YAML) and print it resolved
  kvrelay calibrate --data F --out P   learn per-layer KV budgets (CMA-ES) on your prompts;
                                point transfer.compression.profile at P, budgets: learned
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from typing import Any

import yaml

from cluster.compression import PRESETS


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted-key overrides from the flags, then from repeated ``--set key=value``."""
    out: dict[str, Any] = {
        "engine.model": args.model,
        "engine.dtype": args.dtype,
        "engine.block_size": args.block_size,
        "engine.kv_cache_memory_gb": args.kv_cache_gb,
        "pools.prefill_workers": args.prefill_workers,
        "pools.decode_workers": args.decode_workers,
        "pools.colocated": True if args.colocated else None,
        "pools.threads_per_worker": args.threads,
        "transfer.transport": args.transport,
        "transfer.compression.preset": args.kv_compression,
        "router.host": getattr(args, "host", None),
        "router.port": getattr(args, "port", None),
        "router.policy": getattr(args, "policy", None),
        "router.api_key": getattr(args, "api_key", None) or os.environ.get("KVRELAY_API_KEY"),
        "prefix_cache.hash_seed": os.environ.get("KVRELAY_HASH_SEED"),
    }
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"kvrelay: --set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _load_config(args: argparse.Namespace):
    from cluster.config import ClusterConfig, ConfigError

    try:
        return ClusterConfig.from_yaml(args.config, _overrides(args))
    except ConfigError as e:
        print(f"kvrelay: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _generate(args: argparse.Namespace) -> int:
    from cluster.launcher import start_cluster, stop_cluster
    from router.tokenizer import load_tokenizer
    from workers.loader import resolve_model
    from workers.sampling_params import SamplingParams

    config = _load_config(args)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        source = resolve_model(config.engine.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvrelay: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(source)
    prompt = tok.encode(args.prompt, add_special_tokens=True) if args.raw else tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}]
    )

    async def run() -> int:
        mode = "colocated" if config.pools.colocated else f"{config.pools.prefill_workers}P+{config.pools.decode_workers}D over {config.transfer.transport}"
        print(f"[starting kvrelay: {mode}, model {source.model_id}]", file=sys.stderr)
        cluster = await start_cluster(config)
        try:
            start = time.perf_counter()
            first = None
            tokens: list[int] = []
            shown, reason = "", None
            async for out in cluster.generate(prompt, params, f"cli-{uuid.uuid4().hex[:8]}"):
                first = first or time.perf_counter()
                tokens += out.new_token_ids
                text = tok.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # never print half a UTF-8 character
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
                reason = out.finish_reason or reason
            total = time.perf_counter() - start
            print()
            print(
                f"[{len(prompt)} prompt tokens, {len(tokens)} generated, finish_reason={reason}, "
                f"TTFT {((first or start) - start) * 1000:.0f} ms, {len(tokens) / total:.1f} tok/s]",
                file=sys.stderr,
            )
            return 0
        except ValueError as e:
            print(f"kvrelay: {e}", file=sys.stderr)
            return 2
        finally:
            await stop_cluster(cluster)

    return asyncio.run(run())


def _serve(args: argparse.Namespace) -> int:
    """Start the cluster and the OpenAI API on Ray Serve; Ctrl-C / SIGTERM stop it all."""
    import signal
    import urllib.request

    from cluster.launcher import init_ray

    # The deployment's secret block-hash seed (the configured one, else fresh): it travels
    # in the config to the router and every worker, and is never printed.
    config = _load_config(args).with_hash_seed().sized_for_host(os.cpu_count())
    r = config.router
    import ray
    from ray import serve

    from router.serve_app import build

    init_ray(config)
    stopping = {"flag": False}

    def stop(signum, frame):  # noqa: ARG001
        stopping["flag"] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    url = f"http://{r.host}:{r.port}"
    try:
        serve.start(http_options={"host": r.host, "port": r.port}, detached=False)
        serve.run(build(config.model_dump()), name="kvrelay", route_prefix="/", blocking=False)
        deadline = time.monotonic() + config.deadlines.startup_s
        while not stopping["flag"]:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except Exception:
                pass
            if time.monotonic() > deadline:
                print(f"kvrelay: the cluster did not become healthy within {config.deadlines.startup_s}s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if not stopping["flag"]:
            print(f"kvrelay is serving {url}/v1 (model {config.engine.model}, policy {r.policy}); Ctrl-C to stop", flush=True)
            print(f"metrics: {url}/metrics (router); every process for Prometheus: {url}/metrics/targets "
                  "(deploy/prometheus/prometheus.yml)", flush=True)
        while not stopping["flag"]:
            time.sleep(0.2)
        print("kvrelay: shutting down", file=sys.stderr, flush=True)
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _check_config(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfig, ConfigError

    try:
        cfg = ClusterConfig.from_yaml(args.file)
    except ConfigError as e:
        print(f"kvrelay: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))  # secrets (the hash seed) as "**********"
    return 0


def _read_prompts(path: str, tokenizer, limit: int | None) -> list[list[int]]:
    """JSONL rows with "messages" (chat, templated as the API does), "prompt" (text) or
    "prompt_token_ids"."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt_token_ids" in row:
                out.append([int(t) for t in row["prompt_token_ids"]])
            elif "messages" in row:
                out.append(tokenizer.apply_chat_template(row["messages"]))
            elif "prompt" in row:
                out.append(tokenizer.encode(row["prompt"], add_special_tokens=True))
            else:
                raise ValueError(f"{path}:{n}: a row needs messages, prompt or prompt_token_ids")
            if limit and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from router.tokenizer import load_tokenizer
    from workers import calibration
    from workers.loader import load_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = calibration.CalibrationSettings(
        keep=tuple(args.keep or [0.25]), target_tokens=args.target_tokens, window=args.window, sinks=args.sinks,
        kernel=args.kernel, max_evals=args.max_evals, time_limit_s=args.time_limit, seed=args.seed)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    try:
        prompts = _read_prompts(args.data, tokenizer, args.limit)
    except (OSError, ValueError) as e:
        print(f"kvrelay calibrate: {e}", file=sys.stderr)
        return 2
    loaded = load_model(source)
    states = [calibration.prepare(loaded.model, p, settings, tokenizer.eos_token_id)
              for p in tqdm(prompts, desc="prefill (full KV)", unit="prompt")]
    bar = tqdm(total=settings.max_evals, desc="CMA-ES", unit="cand")

    def progress(evals: int, best: float) -> None:
        bar.update(evals - bar.n)
        bar.set_postfix(best_kl=f"{best:.4f}")

    result = calibration.calibrate(loaded.model, states, settings, progress)
    bar.close()
    calibration.write_profile(args.out, loaded.config.name, result, settings, len(states),
                              sum(s.prompt_len for s in states) / len(states))
    print(f"profile written to {args.out}: mean KL learned {result.objective:.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.baselines.items())
          + f" ({result.evaluations} candidates, {result.seconds:.0f} s)")
    return 0


def _cluster_flags(g: argparse.ArgumentParser) -> None:
    g.add_argument("--config", default=None, help="cluster config YAML (see deploy/ and the README)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. engine.block_size=32")
    g.add_argument("--model", default=None, help="'default' (embedded SmolLM2), a .gguf file or a HF directory")
    g.add_argument("--prefill-workers", type=int, default=None)
    g.add_argument("--decode-workers", type=int, default=None)
    g.add_argument("--colocated", action="store_true", help="no disaggregation: each worker does both phases")
    g.add_argument("--transport", choices=["ucx", "inprocess"], default=None)
    g.add_argument("--kv-compression", choices=list(PRESETS), default=None,
                   help="KV payload preset between the pools (default none: dedup only); see the README")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool per worker")
    g.add_argument("--threads", type=int, default=None, help="torch threads per worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="start the cluster locally and stream one completion")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    _cluster_flags(g)
    g.set_defaults(func=_generate)
    s = sub.add_parser("serve", help="start the cluster and serve the OpenAI API (the main job)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--policy", choices=["kv_aware", "round_robin", "least_loaded"], default=None)
    s.add_argument("--api-key", default=None, help="require this bearer key (or set KVRELAY_API_KEY)")
    _cluster_flags(s)
    s.set_defaults(func=_serve)
    c = sub.add_parser("check-config", help="validate a cluster config file")
    c.add_argument("file")
    c.set_defaults(func=_check_config)
    k = sub.add_parser("calibrate", help="learn per-layer KV budgets for sparse payloads on your prompts")
    k.add_argument("--model", default="default", help="'default' (embedded SmolLM2), a .gguf file or a HF directory")
    k.add_argument("--data", required=True, help="JSONL: messages / prompt / prompt_token_ids per row")
    k.add_argument("--out", required=True, help="profile JSON to write")
    k.add_argument("--keep", type=float, action="append", help="keep fraction(s) to optimise for (default 0.25)")
    k.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    k.add_argument("--target-tokens", type=int, default=16, help="full-KV continuation tokens scored per prompt")
    k.add_argument("--window", type=int, default=32)
    k.add_argument("--sinks", type=int, default=4)
    k.add_argument("--kernel", type=int, default=63)
    k.add_argument("--max-evals", type=int, default=240, help="CMA-ES candidates, at most")
    k.add_argument("--time-limit", type=float, default=900.0, help="seconds of search, at most")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--threads", type=int, default=None, help="torch threads")
    k.set_defaults(func=_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
