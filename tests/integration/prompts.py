"""Test prompts of many lengths, chat-templated and raw (no data files needed)."""

from __future__ import annotations

PASSAGE = (
    "Disaggregated serving splits the two phases of LLM inference across separate pools of "
    "workers. Prefill reads the whole prompt at once and is bound by compute; decode produces "
    "one token at a time for every running request and is bound by memory bandwidth. When both "
    "run on the same worker, a long prompt arriving in the middle of a batch stalls every "
    "decoding request for the duration of its prefill. Moving the prefill elsewhere removes the "
    "stall, but the key-value cache computed by the prefill must then travel to the decode "
    "worker, and that transfer costs time and bandwidth. A router that knows which worker "
    "already holds which prefix can avoid recomputing shared prompts entirely. "
)


def long_text(n_chars: int) -> str:
    reps = n_chars // len(PASSAGE) + 1
    return "".join(f"[{i}] " + PASSAGE for i in range(reps))[:n_chars]


def mixed_prompts(tok) -> list[list[int]]:
    """8 prompts from ~10 to 1,000+ tokens, raw and chat-templated."""
    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}])  # noqa: E731
    return [
        tok.encode("The quick brown fox jumps over"),
        chat("What is the capital of France?"),
        chat("Write a haiku about the sea."),
        tok.encode("def fibonacci(n):\n    "),
        tok.encode(long_text(900)),
        chat("Summarize the following text in two sentences:\n" + long_text(1800)),
        tok.encode(long_text(2600)),
        chat("Here are my notes. What are the key points?\n" + long_text(5400)),
    ]
