"""The outside reference: NVIDIA kvpress's SnapKV press on the same items, in its own
virtual environment (bench/quality/kvpress_env.py), scored here with the suite's metric.

    python -m bench.quality.reference --items 1024 --out /tmp/kvpress.jsonl   # run it
    python -m bench.quality.suite --render bench/results/quality.json --kvpress /tmp/kvpress.jsonl

kvpress compresses the whole prompt after a full prefill (its press hooks every
attention layer) and decodes greedily at the true positions; kvrelay's sparse configs
without quantization (``s0.25``: SnapKV keep 0.25, window 32, kernel 63, uniform) are the
same algorithm at the same settings, so the two should score alike; kvpress's default
kernel is 5 and is run too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.needle import wilson
from bench.quality.suite import MAX_TOKENS, _pct, eval_items, paired

CONFIGS = [
    {"name": "kvpress snapkv k63 keep0.25", "keep": 0.25, "window": 32, "kernel": 63},
    {"name": "kvpress snapkv k5 keep0.25", "keep": 0.25, "window": 32, "kernel": 5},
    {"name": "kvpress snapkv k63 keep0.125", "keep": 0.125, "window": 32, "kernel": 63},
]
# kvrelay's configuration at the same settings (no quantization) for the side-by-side.
# kvpress_ref.py adds its uncompressed config, named "full", to every run.
SAME_AS = {"full": "none", "kvpress snapkv k63 keep0.25": "s0.25", "kvpress snapkv k63 keep0.125": "s0.125",
           "kvpress snapkv k5 keep0.25": "s0.25"}


def score_kvpress(preds: Path, res: dict[str, Any]) -> dict[str, Any]:
    """Rows per kvpress config, compared with kvrelay's records of the same items."""
    from bench.quality import tasks

    items = {it.id: it for it in _items_of(res)}
    ours = {(r["id"], r["config"]): r for r in res["records"]}
    rows_in = [json.loads(x) for x in preds.read_text().splitlines() if x.strip()]
    rows = []
    for cfg in dict.fromkeys(r["config"] for r in rows_in):
        recs = [r for r in rows_in if r["config"] == cfg and r["id"] in items]
        scores = {r["id"]: tasks.score(items[r["id"]], r["text"]) for r in recs}
        k = sum(scores.values())
        mine = SAME_AS.get(cfg)
        pairs = [(scores[i], ours[(i, mine)]["score"]) for i in scores if (i, mine) in ours]
        kept = [sum(r["kept_tokens_per_layer"]) / (len(r["kept_tokens_per_layer"]) * r["prompt_tokens"])
                for r in recs if r.get("kept_tokens_per_layer")]
        full = {r["id"]: r for r in rows_in if r["config"] == "full"}
        agree = [r["text"] == full[r["id"]]["text"] for r in recs if r["id"] in full]
        rows.append({"config": cfg, "n": len(recs), "accuracy": k / max(1, len(recs)),
                     "wilson": wilson(round(k), len(recs)), "kvrelay_same": mine,
                     "vs_kvrelay": paired([b - a for a, b in pairs]), "pairs": len(pairs),
                     "kvrelay_accuracy": sum(b for _, b in pairs) / max(1, len(pairs)),
                     "kept": sum(kept) / len(kept) if kept else None,
                     "ratio": len(kept) / sum(kept) if kept else None,
                     "agree_full": sum(agree) / max(1, len(agree)),
                     "seconds": sum(r["seconds"] for r in recs) / max(1, len(recs))})
    head = ["kvpress config", "n", "kept", "accuracy % (95% CI)", "kvrelay config, same items", "kvrelay accuracy %",
            "kvrelay - kvpress, pts (95% CI)", "greedy = kvpress full", "s / item"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, a, b = r["vs_kvrelay"]
        table.append("| " + " | ".join([
            f"`{r['config']}`", str(r["n"]), _pct(r["kept"], 0), f"{_pct(r['accuracy'])} ({_pct(r['wilson'][0], 0)}-"
            f"{_pct(r['wilson'][1], 0)})", f"`{r['kvrelay_same']}`", _pct(r["kvrelay_accuracy"]),
            f"{100 * m:+.1f} ({100 * a:+.1f}, {100 * b:+.1f})", _pct(r["agree_full"], 0) + "%", f"{r['seconds']:.1f}"]) + " |")
    return {"rows": rows, "table": table, "source": str(preds)}


def _items_of(res: dict[str, Any]) -> list:
    """The suite's evaluation items again (generation is deterministic and cached)."""
    args = argparse.Namespace(**res["args"]) if "args" in res else None
    if args is None:
        raise ValueError("results file has no args: re-run the suite")
    return eval_items(args)


def main(argv: list[str] | None = None) -> int:
    from bench.quality import tasks
    from bench.quality.kvpress_env import ensure_env, run_reference

    p = argparse.ArgumentParser(prog="python -m bench.quality.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="bench/results/quality.json", help="the suite's run (its items are reused)")
    p.add_argument("--lengths", type=int, nargs="*", default=[1024], help="which of its lengths to run")
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    items = [it for it in _items_of(res) if it.length in args.lengths and (not args.tasks or it.task in args.tasks)]
    items_path = Path(args.out).with_suffix(".items.jsonl")
    tasks.write_jsonl([it for it in items], items_path)
    # every row gets the suite's generation budget
    rows = [json.loads(x) for x in items_path.read_text().splitlines()]
    items_path.write_text("".join(json.dumps({**r, "max_tokens": MAX_TOKENS}) + "\n" for r in rows))
    ensure_env()
    run_reference(items_path, Path(args.out), CONFIGS, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
