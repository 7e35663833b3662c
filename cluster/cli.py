"""The ``kvrelay`` command line.

``kvrelay generate "prompt"`` runs the embedded engine offline and streams the
answer to stdout (the serving commands arrive with the cluster and router)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid


def _generate(args: argparse.Namespace) -> int:
    import torch

    from router.tokenizer import load_tokenizer
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.loader import load_model, resolve_model
    from workers.sampling_params import SamplingParams

    try:
        config = EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
            kv_cache_memory_gb=args.kv_cache_gb, num_threads=args.threads,
        )
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed,
        )
        source = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvrelay: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(source)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    engine = Engine(config, loaded=load_model(source, config.resolved_dtype(), config.resolved_device()))
    if args.raw:
        prompt = tok.encode(args.prompt, add_special_tokens=True)
    else:
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    rid = f"cli-{uuid.uuid4().hex[:8]}"
    try:
        engine.add_request(rid, prompt, params)
    except ValueError as e:
        print(f"kvrelay: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    tokens: list[int] = []
    shown = ""
    first = None
    reason = None
    while engine.has_unfinished:
        for out in engine.step():
            first = first or time.perf_counter()
            tokens += out.new_token_ids
            text = tok.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # never print half a UTF-8 character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
            reason = out.finish_reason
    total = time.perf_counter() - start
    print()
    print(
        f"[{len(prompt)} prompt tokens, {len(tokens)} generated, finish_reason={reason}, "
        f"TTFT {((first or start) - start) * 1000:.0f} ms, {len(tokens) / total:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrelay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=os.environ.get("KVRELAY_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion offline with the embedded engine")
    g.add_argument("prompt")
    g.add_argument("--model", default="default", help="'default' (embedded SmolLM2), a .gguf file or a HF directory")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-gb", type=float, default=0.5)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    g.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
