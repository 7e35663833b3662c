"""Outside reference for kvrelay's sparse codec: NVIDIA kvpress's SnapKVPress on the same items.

Runs INSIDE the kvpress venv (bench/quality/kvpress_env.py creates it; run_reference() calls this script):
plain transformers + kvpress + torch, nothing imported from the project. The module's top level imports only
the standard library, so its pure helpers (config parsing, resume bookkeeping) import anywhere; torch,
transformers and kvpress are imported inside the functions that need them.

    python kvpress_ref.py --items items.jsonl --out preds.jsonl --gguf /path/model.gguf \\
        --configs '[{"name": "kvpress-snapkv-k63-keep0.25", "keep": 0.25, "window": 32, "kernel": 63}]' \\
        [--threads 1] [--attn sdpa|eager] [--no-full] [--deadline EPOCH_SECONDS] [--dump-indices]

Items (one JSON object a line): "id", "messages" (chat messages: the prompt ids are
``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``, exactly as kvrelay's router), an
optional "prompt_ids" (used instead when present; a mismatch with the templated ids is reported), "max_tokens".
Pass "prompt_ids" from the main venv when you can: this venv's transformers (5.2) builds the GGUF's tokenizer
differently (a CodeLlamaTokenizer; same ids on the needle prompts tried, but not guaranteed everywhere).

Per (item, config), mirroring kvpress's KVPressTextGenerationPipeline for a whole prompt with no question:
  * prefill of the WHOLE prompt (positions 0..P-1) with ``SnapKVPress(compression_ratio=1-keep,
    window_size=window, kernel_size=kernel)`` active: kvpress's forward hook compresses each layer's cache right
    after that layer's attention forward, so the prefill itself is full attention and the first token (argmax
    of the prefill's last logits) is the uncompressed model's, as kvrelay's prefill worker samples it;
  * greedy decode of the remaining tokens outside the press context with ``position_ids = P, P+1, ...`` (the
    true positions, as the pipeline's ``generate_answer`` passes ``context_length + i``), not the compressed
    cache length; stop at the GGUF's EOS (<|im_end|>, as kvrelay's engine; not included in token_ids/text) or
    after max_tokens tokens.
The "full" config (no press) is the uncompressed reference; it is added unless --no-full.

Output rows (appended and flushed one by one; (id, config) pairs already in --out are skipped, so a killed run
resumes): {"id", "config", "text", "token_ids", "prompt_tokens", "kept_tokens_per_layer", "n_kept_expected",
"finish_reason", "seconds", "prefill_seconds", "keep", "window", "kernel"} (+ "kept_indices" [layer][kv head],
ascending prompt positions, with --dump-indices on compressed rows).
Exit status 3: the --deadline passed before every row was written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

FULL = "full"
DEADLINE_EXIT = 3


# ----------------------------------------------------------------------------------------------- pure helpers

def config_name(keep: float, window: int, kernel: int) -> str:
    """The default name of a SnapKV config: kvpress-snapkv-k63-keep0.25 (window added when not 32)."""
    name = f"kvpress-snapkv-k{kernel}-keep{keep:g}"
    return name if window == 32 else f"{name}-w{window}"


def parse_configs(spec: str | list, add_full: bool = True) -> list[dict]:
    """Validate a JSON list (or the list itself) of {"name"?, "keep", "window", "kernel"} (all three required;
    {"name": "full"} alone is the uncompressed config); return normalised
    dicts {"name", "keep", "window", "kernel"} (keep/window/kernel None for the "full" config), "full" first
    when add_full and not already given. Names must be unique."""
    raw = json.loads(spec) if isinstance(spec, str) else spec
    if not isinstance(raw, list):
        raise ValueError(f"--configs must be a JSON list, got {type(raw).__name__}")
    out: list[dict] = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise ValueError(f"config #{i} is not an object: {c!r}")
        unknown = set(c) - {"name", "keep", "window", "kernel"}
        if unknown:
            raise ValueError(f"config #{i} has unknown keys {sorted(unknown)}")
        if c.get("name") == FULL:
            if any(c.get(k) is not None for k in ("keep", "window", "kernel")):
                raise ValueError(f"config #{i}: the {FULL!r} config is uncompressed and takes no keep/window/kernel")
            out.append({"name": FULL, "keep": None, "window": None, "kernel": None})
            continue
        missing = [k for k in ("keep", "window", "kernel") if k not in c]
        if missing:  # no silent defaults: kvpress's own (window 64, kernel 5) differ from kvrelay's (32, 63)
            raise ValueError(f"config #{i} lacks {missing}")
        keep, window, kernel = c["keep"], c["window"], c["kernel"]
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ValueError(f"config #{i}: keep must be in (0, 1], got {keep!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"config #{i}: window must be an int >= 1, got {window!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"config #{i}: kernel must be an odd int >= 1, got {kernel!r}")
        name = c.get("name") or config_name(float(keep), window, kernel)
        if not isinstance(name, str) or not name:
            raise ValueError(f"config #{i}: name must be a non-empty string, got {name!r}")
        out.append({"name": name, "keep": float(keep), "window": window, "kernel": kernel})
    names = [c["name"] for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate config names: {dup}")
    if add_full and FULL not in names:
        out.insert(0, {"name": FULL, "keep": None, "window": None, "kernel": None})
    return out


def compression_ratio(keep: float) -> float:
    """kvpress's compression_ratio for a keep fraction."""
    return 1.0 - keep


def expected_n_kept(prompt_len: int, keep: float | None) -> int:
    """Tokens per layer kvpress's ScorerPress keeps: utils.compute_n_kept = max(1, int(P * (1 - ratio))) with
    ratio = 1 - keep, computed in floats exactly as kvpress does (1 - (1 - 0.1) = 0.0999..., so P=600 at keep
    0.1 keeps 59, not 60). A keep of 1 (ratio 0) keeps everything (ScorerPress returns the cache untouched)."""
    if keep is None:
        return prompt_len
    ratio = compression_ratio(keep)
    if ratio == 0:
        return prompt_len
    if ratio >= 1.0:
        return 0
    return max(1, int(prompt_len * (1 - ratio)))


def load_items(path: Path) -> list[dict]:
    """Rows of an items.jsonl; each needs "id", "max_tokens" and "messages" or "prompt_ids"."""
    items, seen = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "id" not in row:
            raise ValueError(f"{path}:{n}: item has no 'id'")
        if "messages" not in row and "prompt_ids" not in row:
            raise ValueError(f"{path}:{n}: item {row['id']!r} has neither 'messages' nor 'prompt_ids'")
        mt = row.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise ValueError(f"{path}:{n}: item {row['id']!r}: max_tokens must be an int >= 1, got {mt!r}")
        key = str(row["id"])
        if key in seen:
            raise ValueError(f"{path}:{n}: duplicate item id {row['id']!r}")
        seen.add(key)
        items.append(row)
    return items


def done_pairs(out_path: Path) -> set[tuple[str, str]]:
    """(id, config) pairs already written to out_path. A torn last line (a run killed mid-write) is ignored;
    rows are keyed by str(id) so int and str ids compare alike."""
    done: set[tuple[str, str]] = set()
    try:
        text = Path(out_path).read_text()
    except FileNotFoundError:
        return done
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "id" in row and "config" in row:
            done.add((str(row["id"]), str(row["config"])))
    return done


def pending(items: list[dict], configs: list[dict], done: set[tuple[str, str]]) -> list[tuple[dict, list[dict]]]:
    """Per item (in order), the configs still to run; items with nothing left are dropped."""
    todo = []
    for it in items:
        cs = [c for c in configs if (str(it["id"]), c["name"]) not in done]
        if cs:
            todo.append((it, cs))
    return todo


def append_row(out_path: Path, row: dict) -> None:
    """Append one JSON row and flush it to disk. If the file ends with a torn line (killed mid-write), start
    on a fresh line so the new row stays parseable."""
    out_path = Path(out_path)
    prefix = ""
    if out_path.exists() and out_path.stat().st_size > 0:
        with open(out_path, "rb") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                prefix = "\n"
    with open(out_path, "a") as f:
        f.write(prefix + json.dumps(row) + "\n")
        f.flush()


# ------------------------------------------------------------------------------------------- model side

def load_model(gguf: Path, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    return tok, model


def prompt_ids_of(tok, item: dict) -> list[int]:
    if "messages" in item:
        ids = list(tok.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
        if "prompt_ids" in item and list(item["prompt_ids"]) != ids:
            print(f"[kvpress-ref] item {item['id']!r}: templated ids differ from the given prompt_ids "
                  f"({len(ids)} vs {len(item['prompt_ids'])} tokens); using prompt_ids", file=sys.stderr)
            return [int(t) for t in item["prompt_ids"]]
        return ids
    return [int(t) for t in item["prompt_ids"]]


def stop_ids(tok, model) -> set[int]:
    """The GGUF's tokenizer.ggml.eos_token_id (2, <|im_end|>), which transformers puts in the model's
    generation_config and kvrelay's engine stops on. NOT tok.eos_token_id: transformers 5.2 builds this GGUF's
    tokenizer as a CodeLlamaTokenizer whose eos_token is <|im_start|> (1)."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = model.config.eos_token_id
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])}


def make_press(cfg: dict):
    if cfg["name"] == FULL or cfg["keep"] is None:
        return None
    from kvpress import SnapKVPress

    return SnapKVPress(compression_ratio=compression_ratio(cfg["keep"]), window_size=cfg["window"],
                       kernel_size=cfg["kernel"])


def _kept_positions(full_keys, kept_keys) -> list[list[int]]:
    """Prompt positions of the keys kvpress kept: each kept key row ([Hkv, n, D]) is matched bit-exactly to
    the layer's uncompressed post-RoPE keys ([Hkv, P, D]; RoPE makes every position's row distinct); sorted
    ascending per KV head."""
    out = []
    for h in range(full_keys.shape[0]):
        where = {full_keys[h, i].numpy().tobytes(): i for i in range(full_keys.shape[1])}
        try:
            out.append(sorted(where[kept_keys[h, j].numpy().tobytes()] for j in range(kept_keys.shape[1])))
        except KeyError:
            raise RuntimeError("a kept key matches no uncompressed key: cannot recover kvpress's indices") from None
    return out


def generate(model, prompt_ids: list[int], max_tokens: int, press, stops: set[int],
             dump_indices: bool = False) -> dict:
    """Full prefill (press active: each layer compressed after its forward), then greedy decode at the true
    positions P, P+1, ... on the compressed cache. dump_indices: also return the kept prompt positions
    [layer][kv head][n] (a forward hook registered before the press's snapshots each layer's full keys)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    p = ids.shape[1]
    cache = DynamicCache()
    full_keys: dict[int, torch.Tensor] = {}
    hooks = []
    if dump_indices:
        def snapshot(module, args, kwargs, output):  # runs before kvpress's hook (registered earlier)
            full_keys[module.layer_idx] = kwargs["past_key_values"].layers[module.layer_idx].keys[0].clone()
        hooks = [layer.self_attn.register_forward_hook(snapshot, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.inference_mode():
            with press(model) if press is not None else contextlib.nullcontext():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for hk in hooks:
            hk.remove()
    kept = [int(layer.keys.shape[-2]) for layer in cache.layers]
    t_prefill = time.perf_counter() - t0
    indices = ([_kept_positions(full_keys[i], layer.keys[0]) for i, layer in enumerate(cache.layers)]
               if dump_indices else None)
    t1 = time.perf_counter()
    with torch.inference_mode():
        nxt = int(out.logits[0, -1].argmax())
        tokens: list[int] = []
        finish = "length"
        for i in range(max_tokens):
            if nxt in stops:
                finish = "stop"
                break
            tokens.append(nxt)
            if i == max_tokens - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[p + i]]))
            nxt = int(out.logits[0, -1].argmax())
    return {"token_ids": tokens, "finish_reason": finish, "kept_tokens_per_layer": kept, "kept_indices": indices,
            "prefill_seconds": t_prefill, "seconds": t_prefill + (time.perf_counter() - t1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", required=True, help="JSON list of {name?, keep, window, kernel}")
    ap.add_argument("--gguf", type=Path, required=True, help="the model's .gguf file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--no-full", action="store_true", help="do not add the uncompressed 'full' config")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds: start no row after it")
    ap.add_argument("--dump-indices", action="store_true",
                    help="add kept_indices [layer][kv head] (kept prompt positions) to compressed rows")
    a = ap.parse_args(argv)

    configs = parse_configs(a.configs, add_full=not a.no_full)
    items = load_items(a.items)
    todo = pending(items, configs, done_pairs(a.out))
    n_rows = sum(len(cs) for _, cs in todo)
    print(f"[kvpress-ref] {len(items)} items x {len(configs)} configs: {n_rows} rows to run", file=sys.stderr)
    if not todo:
        return 0
    if a.deadline is not None and time.time() > a.deadline:
        print("[kvpress-ref] deadline passed before the model loaded", file=sys.stderr)
        return DEADLINE_EXIT

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization bar ignores its own switch
    import torch

    torch.set_num_threads(a.threads)
    import kvpress  # noqa: F401  (patches the attention functions, as any kvpress user gets)

    tok, model = load_model(a.gguf, a.attn)
    stops = stop_ids(tok, model)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for item, cs in todo:
        ids = prompt_ids_of(tok, item)
        for cfg in cs:
            if a.deadline is not None and time.time() > a.deadline:
                print("[kvpress-ref] deadline passed; stopping (rerun to resume)", file=sys.stderr)
                return DEADLINE_EXIT
            if cfg["window"] is not None and len(ids) <= cfg["window"]:
                raise ValueError(f"item {item['id']!r}: {len(ids)} prompt tokens; kvpress's SnapKV needs more "
                                 f"than window={cfg['window']}")
            press = make_press(cfg)
            res = generate(model, ids, int(item["max_tokens"]), press, stops,
                           dump_indices=a.dump_indices and press is not None)
            row = {"id": item["id"], "config": cfg["name"],
                   "text": tok.decode(res["token_ids"], skip_special_tokens=True),
                   "token_ids": res["token_ids"], "prompt_tokens": len(ids),
                   "kept_tokens_per_layer": res["kept_tokens_per_layer"],
                   "n_kept_expected": expected_n_kept(len(ids), cfg["keep"]),
                   "finish_reason": res["finish_reason"], "seconds": round(res["seconds"], 4),
                   "prefill_seconds": round(res["prefill_seconds"], 4),
                   "keep": cfg["keep"], "window": cfg["window"], "kernel": cfg["kernel"]}
            if res["kept_indices"] is not None:
                row["kept_indices"] = res["kept_indices"]
            append_row(a.out, row)
            print(f"[kvpress-ref] {item['id']} {cfg['name']}: {res['seconds']:.2f}s "
                  f"kept {min(row['kept_tokens_per_layer'])}/{len(ids)} {row['text'][:60]!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
