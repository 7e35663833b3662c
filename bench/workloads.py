"""Workloads for bench/loadgen.py: lists of sessions, deterministic for a given seed, so
every server configuration gets exactly the same requests.

* ``multi_turn_chat``: conversations about a document (a distinct document in each
  conversation's system message); every turn sends the whole history, the model's
  previous answers included, plus a new question. Turns are closed-loop (the next
  turn waits for the answer, then a think time); conversations start at Poisson times.
* ``shared_system_prompt``: many requests with the same long system prompt and
  different short questions, Poisson arrivals.
* ``mooncake_replay``: the Mooncake conversation trace scaled to this machine. Prompts
  are token ids (``/v1/completions`` accepts ``"prompt": [ids]``): each trace block id
  maps to a fixed pseudo-random token sequence of ``block_tokens`` tokens seeded by the
  id, so equal ``hash_ids`` give equal tokens exactly, and with ``block_tokens`` a
  multiple of the engine's block size the trace's shared prefixes are shared engine
  blocks. Input lengths are divided by ``input_scale`` (and capped), outputs capped,
  and arrival times multiplied by ``time_scale``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import RequestRecord, RequestSpec, Session, poisson_arrivals, trace_arrivals

TRACE_PATH = Path("/work/shared/traces/mooncake_conversation.jsonl")
TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake trace


@dataclass
class Workload:
    name: str
    description: str
    sessions: list[Session]
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # what the workload looks like (offline)

    @property
    def num_requests(self) -> int:
        """Requests the workload sends (turn counts of callable sessions from params)."""
        n = 0
        for s in self.sessions:
            n += len(s.turns) if not callable(s.turns) else int(self.params.get("turns", 1))
        return n


# ---------------------------------------------------------------------------------------
# deterministic text
# ---------------------------------------------------------------------------------------

_WORDS = (
    "river mountain engine harbor garden market library station signal window paper copper "
    "winter summer forest valley bridge tower village castle ocean island desert canyon meadow "
    "planet comet orbit rocket sensor cable battery motor valve pump filter circuit switch "
    "farmer teacher doctor pilot sailor painter writer builder driver baker tailor miner "
    "quickly slowly carefully quietly rarely often always never gently firmly briefly "
    "red green blue silver golden wooden stone glass narrow wide ancient modern small large "
    "builds carries measures repairs studies protects follows crosses collects divides opens "
    "closes lifts lowers counts checks sends receives stores cleans paints moves turns holds "
    "water light sound heat wind rain snow salt sugar iron wheat rice coffee tea bread cheese "
    "north south east west morning evening season harvest festival journey lesson record "
    "machine factory office kitchen school hospital museum theater stadium airport tunnel road"
).split()


def words(rng: random.Random, n: int) -> str:
    """``n`` pseudo-random words as sentences of 6-14 words."""
    out, sentence = [], []
    target = rng.randint(6, 14)
    for _ in range(n):
        sentence.append(rng.choice(_WORDS))
        if len(sentence) >= target:
            out.append(" ".join(sentence).capitalize() + ".")
            sentence, target = [], rng.randint(6, 14)
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


# ---------------------------------------------------------------------------------------
# (a) multi-turn chat
# ---------------------------------------------------------------------------------------

_QUESTIONS = [
    "What is this document about? Answer in one sentence.",
    "Name one place the document mentions.",
    "Which tools or machines appear in it?",
    "Suggest a short title for it.",
    "Is the tone happy or sad? One word.",
    "Summarize your previous answers in one sentence.",
]


def multi_turn_chat(
    conversations: int = 4,
    turns: int = 3,
    doc_words: int = 200,
    max_tokens: int = 24,
    rate_per_s: float = 0.5,
    think_s: float = 0.5,
    seed: int = 0,
) -> Workload:
    """``conversations`` chats of ``turns`` turns each about a ``doc_words``-word
    document. Greedy decoding (temperature 0), so every server sees the same answers as
    long as its numerics agree; each turn sends the full history."""
    starts = poisson_arrivals(conversations, rate_per_s, seed=seed + 11)
    sessions = []
    for c in range(conversations):
        rng = random.Random(f"chat-{seed}-{c}")
        system = (
            f"You are a helpful assistant. Answer briefly, using only the document below.\n\n"
            f"Document {c + 1}:\n{words(rng, doc_words)}"
        )
        questions = [_QUESTIONS[(c + t) % len(_QUESTIONS)] for t in range(turns)]

        def next_turn(history: list[RequestRecord], system=system, questions=questions, c=c) -> RequestSpec | None:
            t = len(history)
            if t >= len(questions):
                return None
            messages = [{"role": "system", "content": system}]
            for i, rec in enumerate(history):
                messages.append({"role": "user", "content": questions[i]})
                messages.append({"role": "assistant", "content": rec.text})
            messages.append({"role": "user", "content": questions[t]})
            return RequestSpec("chat", {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0},
                               meta={"workload": "chat", "conversation": c, "turn": t})

        sessions.append(Session(f"chat{c}", starts[c], next_turn, think_s=think_s))
    return Workload(
        "multi_turn_chat",
        f"{conversations} conversations x {turns} turns, a distinct ~{doc_words}-word document in each system message, "
        f"history (with the model's answers) resent every turn, max_tokens {max_tokens}, greedy; conversations start "
        f"Poisson {rate_per_s}/s, next turn {think_s}s after the answer",
        sessions,
        dict(conversations=conversations, turns=turns, doc_words=doc_words, max_tokens=max_tokens,
             rate_per_s=rate_per_s, think_s=think_s, seed=seed),
    )


# ---------------------------------------------------------------------------------------
# (b) a shared long system prompt
# ---------------------------------------------------------------------------------------


def shared_system_prompt(
    requests: int = 16,
    system_words: int = 350,
    max_tokens: int = 16,
    rate_per_s: float = 1.0,
    seed: int = 0,
) -> Workload:
    """``requests`` chat requests, one shared ``system_words``-word system prompt, a
    distinct short question each; Poisson arrivals; ``max_tokens`` tokens each
    (``ignore_eos``, so every answer has the same length on every server)."""
    rng = random.Random(f"system-{seed}")
    system = (
        "You are the support assistant of the Northwind Works company. Follow the handbook below exactly.\n\n"
        f"Handbook:\n{words(rng, system_words)}"
    )
    qrng = random.Random(f"questions-{seed}")
    starts = poisson_arrivals(requests, rate_per_s, seed=seed + 7)
    sessions = []
    for i in range(requests):
        q = f"Question {i + 1}: what does the handbook say about the {qrng.choice(_WORDS)} and the {qrng.choice(_WORDS)}?"
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        sessions.append(Session(f"shared{i}", starts[i], [RequestSpec("chat", body, meta={"workload": "shared", "i": i})]))
    return Workload(
        "shared_system_prompt",
        f"{requests} requests sharing one ~{system_words}-word system prompt, a distinct one-line question each, "
        f"{max_tokens} output tokens each (ignore_eos), Poisson {rate_per_s}/s",
        sessions,
        dict(requests=requests, system_words=system_words, max_tokens=max_tokens, rate_per_s=rate_per_s, seed=seed),
    )


# ---------------------------------------------------------------------------------------
# (c) Mooncake trace replay
# ---------------------------------------------------------------------------------------


def load_trace(path: str | Path = TRACE_PATH, limit: int | None = None) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def trace_parents(trace: Sequence[dict[str, Any]], min_shared_blocks: int = 2) -> dict[int, int]:
    """request index -> the earlier request it extends (the owner of its longest
    prefix of already-seen block ids, when that prefix has >= ``min_shared_blocks``
    blocks; the trace's block 0 is shared by nearly every request, so 1 block is not a
    conversation)."""
    owner: dict[int, int] = {}
    parent: dict[int, int] = {}
    for i, r in enumerate(trace):
        k, par = 0, None
        for h in r["hash_ids"]:
            if h not in owner:
                break
            k, par = k + 1, owner[h]
        if k >= min_shared_blocks and par is not None:
            parent[i] = par
        for h in r["hash_ids"]:
            owner.setdefault(h, i)
    return parent


def trace_roots(trace: Sequence[dict[str, Any]]) -> list[int]:
    """request index -> the first request of its conversation (chain of parents)."""
    parent = trace_parents(trace)
    root: list[int] = []
    for i in range(len(trace)):
        root.append(root[parent[i]] if i in parent else i)
    return root


def select_trace(
    trace: Sequence[dict[str, Any]], n: int, select: str = "conversations", max_turns: int = 4
) -> list[int]:
    """Indices of the requests to replay, in trace order.

    ``first``: the first ``n`` requests (in the Mooncake conversation trace these are
    almost all first turns: later turns of a conversation come minutes later, so the
    first 60 requests share only block 0).
    ``conversations``: whole conversations (chains of requests that extend an earlier
    one), in order of their first request, those with >= 2 requests only, at most
    ``max_turns`` requests each, until ``n`` requests."""
    if select == "first":
        return list(range(min(n, len(trace))))
    if select != "conversations":
        raise ValueError(f"select must be 'first' or 'conversations', got {select!r}")
    root = trace_roots(trace)
    members: dict[int, list[int]] = {}
    for i in range(len(trace)):
        members.setdefault(root[i], []).append(i)
    chosen: list[int] = []
    for r in sorted(members):
        m = members[r][:max_turns]
        if len(m) < 2:
            continue
        if len(chosen) + len(m) > n:
            m = m[: n - len(chosen)]
            if len(m) < 2:
                break
        chosen += m
        if len(chosen) >= n:
            break
    return sorted(chosen)


def block_tokens_of(hash_id: int, block_tokens: int, token_range: tuple[int, int], seed: int) -> list[int]:
    rng = random.Random(f"mooncake-block-{seed}-{hash_id}")
    lo, hi = token_range
    return [rng.randrange(lo, hi) for _ in range(block_tokens)]


def ideal_prefix_hits(prompts: Sequence[Sequence[int]], block_size: int) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of one unbounded prefix cache seeing the prompts in
    order, block-granular (a full block is reusable when the whole prefix up to it
    was seen before); an upper bound for any placement."""
    seen: set[tuple[int, ...]] = set()
    hits = total = 0
    for p in prompts:
        total += len(p)
        full = len(p) // block_size
        matched, stop = 0, False
        for b in range(full):
            key = tuple(p[: (b + 1) * block_size])
            if not stop and key in seen:
                matched += 1
            else:
                stop = True
            seen.add(key)
        # an engine never serves the last token from cache: it needs one to compute
        hits += min(matched * block_size, max(0, len(p) - 1) // block_size * block_size)
    return hits, total


def lru_placement_estimate(
    prompts: Sequence[Sequence[int]], block_size: int, workers: int, capacity_blocks: int, policy: str,
    cold_share: float = 0.25,
) -> int:
    """Prompt tokens computed when the prompts, in order and one at a time, go to
    ``workers`` prefix caches of ``capacity_blocks`` blocks each (LRU over full blocks,
    a prompt's blocks touched when it runs). ``policy``: "round_robin" (strict
    rotation) or "affine" (the worker holding the longest prefix, when it is at least
    ``cold_share`` of the prompt, else the worker that started the fewest new prefixes:
    kv_aware's rule without load or time). An order-only estimate for choosing a KV
    size: no concurrency, no decode side, no timing; the real run decides."""
    from collections import OrderedDict

    if policy not in ("round_robin", "affine"):
        raise ValueError(f"policy must be round_robin or affine, got {policy!r}")
    caches: list[OrderedDict] = [OrderedDict() for _ in range(workers)]
    started = [0] * workers
    computed = turn = 0
    for p in prompts:
        keys = [tuple(p[: (b + 1) * block_size]) for b in range(len(p) // block_size)]
        usable = max(0, len(p) - 1) // block_size  # the last token is always computed

        def match(cache: OrderedDict) -> int:
            n = 0
            while n < min(len(keys), usable) and keys[n] in cache:
                n += 1
            return n

        held = [match(c) for c in caches]
        if policy == "round_robin":
            w, turn = turn % workers, turn + 1
        elif max(held) and max(held) * block_size >= cold_share * len(p):
            w = max(range(workers), key=lambda i: (held[i], -i))
        else:
            w = min(range(workers), key=lambda i: (started[i], i))
            started[w] += 1
        computed += len(p) - held[w] * block_size
        cache = caches[w]
        for k in keys:
            cache[k] = None
            cache.move_to_end(k)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return computed


def mooncake_replay(
    requests: int = 32,
    select: str = "conversations",
    max_turns: int = 4,
    input_scale: int = 32,
    max_input_tokens: int = 512,
    max_output_tokens: int = 16,
    time_scale: float = 0.05,
    engine_block_size: int = 16,
    token_range: tuple[int, int] = (1000, 40000),
    path: str | Path = TRACE_PATH,
    seed: int = 0,
) -> Workload:
    """The trace scaled down: input ``ceil(input_length / input_scale)`` tokens capped at
    ``max_input_tokens``, built from blocks of ``512 / input_scale`` tokens (one per hash
    id, the last one cut); output ``min(output_length, max_output_tokens)`` tokens
    (``ignore_eos``); arrival = trace time x ``time_scale``. Token ids are drawn from
    ``token_range`` (ordinary vocabulary, no special tokens)."""
    if TRACE_BLOCK_TOKENS % input_scale:
        raise ValueError(f"input_scale must divide {TRACE_BLOCK_TOKENS}")
    block_tokens = TRACE_BLOCK_TOKENS // input_scale
    # conversations may span the whole trace; the first n requests need only n lines
    trace = load_trace(path, limit=requests if select == "first" else None)
    idx = select_trace(trace, requests, select, max_turns)
    chosen = [trace[i] for i in idx]
    times = trace_arrivals([r["timestamp"] for r in chosen], time_scale)
    prompts, sessions = [], []
    for k, (i, r, t) in enumerate(zip(idx, chosen, times)):
        n_in = max(1, min(max_input_tokens, math.ceil(r["input_length"] / input_scale)))
        toks: list[int] = []
        for h in r["hash_ids"]:
            if len(toks) >= n_in:
                break
            toks += block_tokens_of(h, block_tokens, token_range, seed)
        toks = toks[:n_in]
        n_out = max(1, min(max_output_tokens, int(r["output_length"])))
        prompts.append(toks)
        body = {"prompt": toks, "max_tokens": n_out, "temperature": 0.0, "ignore_eos": True}
        meta = {"workload": "mooncake", "trace_index": i, "trace_timestamp_ms": r["timestamp"],
                "input_tokens": len(toks), "output_tokens": n_out}
        sessions.append(Session(f"trace{i}", t, [RequestSpec("completions", body, meta=meta)]))
    hits, total = ideal_prefix_hits(prompts, engine_block_size)
    roots = trace_roots(trace)
    span = times[-1] if times else 0.0
    stats = {
        "requests": len(sessions),
        "trace_span_s": (chosen[-1]["timestamp"] - chosen[0]["timestamp"]) / 1000 if chosen else 0,
        "replay_span_s": span,
        "input_tokens_total": total,
        "input_tokens_mean": total / len(prompts) if prompts else 0,
        "input_tokens_max": max((len(p) for p in prompts), default=0),
        "inputs_capped": sum(1 for p in prompts if len(p) >= max_input_tokens),
        "output_tokens_total": sum(s.turns[0].body["max_tokens"] for s in sessions),
        "ideal_hit_tokens": hits,
        "ideal_hit_share": hits / total if total else 0.0,
        "conversations": len({roots[i] for i in idx}),
    }
    return Workload(
        "mooncake_replay",
        f"Mooncake conversation trace, {len(sessions)} requests ({select}"
        + (f", whole conversations of >= 2 requests, <= {max_turns} each" if select == "conversations" else "")
        + f"), input / {input_scale} capped at {max_input_tokens} tokens ({block_tokens}-token blocks per hash id, "
        f"token-id prompts), output capped at {max_output_tokens} (ignore_eos), arrival times x {time_scale}",
        sessions,
        dict(requests=requests, select=select, max_turns=max_turns, input_scale=input_scale,
             max_input_tokens=max_input_tokens, max_output_tokens=max_output_tokens, time_scale=time_scale,
             block_tokens=block_tokens, token_range=list(token_range), seed=seed, path=str(path)),
        stats,
    )

