"""Structured output: a request's JSON schema as a token mask, through llguidance
(the grammar library vLLM and SGLang also use; a small wheel that runs on CPU).

Each request with a ``json_schema`` gets a matcher on its first sampled step. The
matcher's state is derived from the request's output tokens, never shipped: before
each mask it consumes the output tokens it has not seen yet. So on a decode worker
the matcher is rebuilt and advanced by the prefill worker's first token (which the
handoff carries), and preemption or recompute changes nothing.

The mask is applied to the whole batch at once: one packed bitmask row per request
([N, ceil(V / 32)] int32, bit t of a row = token t allowed), unpacked into a boolean
[N, V] and written as -inf into the logits."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cluster.json_schema import grammar_for
from workers.request import Request

log = logging.getLogger(__name__)


@dataclass
class GrammarState:
    """A request's matcher and how many of its output tokens it has consumed."""

    matcher: Any  # llguidance.LLMatcher
    consumed: int = 0
    failed: bool = False  # the matcher refused a token (logged once; the mask is off)


def load_hf_tokenizer(source):
    """The checkpoint's own tokenizer (the GGUF file's vocabulary, or the HF directory's
    files), as the router loads it; never fetched from a hub."""
    from transformers import AutoTokenizer

    if source.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    return AutoTokenizer.from_pretrained(str(source.path))


class Grammars:
    """Builds matchers for one engine. The tokenizer is loaded on first use (an engine
    that never sees a structured request never loads it)."""

    def __init__(self, hf_tokenizer_loader) -> None:
        self._load = hf_tokenizer_loader
        self._tokenizer = None  # llguidance.LLTokenizer
        self._lock = threading.Lock()
        self._preloading = False

    def preload(self) -> None:
        """Start building the tokenizer on a background thread (seconds on a busy CPU
        for a GGUF vocabulary). The engine calls this when the first structured request
        is admitted or reserved, so the load overlaps that request's prefill instead of
        stalling the step loop; engines that never see one never pay for it."""
        if self._preloading or self._tokenizer is not None:
            return
        self._preloading = True

        def load() -> None:
            try:
                self.tokenizer
            except Exception as e:  # noqa: BLE001 - the sampler raises it again, on the request
                log.warning("grammar tokenizer: %s", e)

        threading.Thread(target=load, name="grammar-tokenizer", daemon=True).start()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._load())
            return self._tokenizer

    def state_of(self, req: Request) -> GrammarState:
        """The request's matcher, advanced over every output token it has not seen."""
        import llguidance

        st = req.grammar
        if st is None:
            st = req.grammar = GrammarState(llguidance.LLMatcher(self.tokenizer, grammar_for(req.params.json_schema)))
        out = req.output_token_ids
        if st.consumed < len(out) and not st.failed:
            new = out[st.consumed :]
            if st.matcher.consume_tokens(new) is False or st.matcher.is_error():
                st.failed = True
                log.warning("%s: the grammar refused output tokens %s (%s); mask off", req.request_id, new,
                            st.matcher.get_error())
        st.consumed = len(out)
        return st

    def apply_masks(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """logits [N, V] float32 on CPU, one row per request: tokens the grammar does
        not allow next become -inf (rows without a schema are left alone)."""
        rows = [i for i, r in enumerate(requests) if r.params.json_schema is not None]
        if not rows:
            return
        import llguidance.torch as lt

        vocab = logits.shape[1]
        states = [self.state_of(requests[i]) for i in rows]
        bitmask = lt.allocate_token_bitmask(len(rows), self.tokenizer.vocab_size)  # [n, W] int32
        for j, st in enumerate(states):
            if st.failed:
                bitmask[j] = -1  # every bit set: all allowed
            else:
                lt.fill_next_token_bitmask(st.matcher, bitmask, j)
        allowed = unpack_bitmask(bitmask, vocab)  # [n, V] bool
        idx = torch.tensor(rows)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


# [256, 8] bool: the bits of a byte, least significant first
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, W] int32 (bit t % 32 of word t // 32) -> [n, vocab] bool; ids past the
    packed width are not allowed. Little-endian bytes: byte b of a word holds bits
    8b .. 8b + 7, so one table lookup per byte keeps token order."""
    n, words = bitmask.shape
    as_bytes = bitmask.contiguous().view(torch.uint8).long()  # [n, 4W]
    bits = _BYTE_BITS[as_bytes].reshape(n, words * 32)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.cat([bits, torch.zeros(n, vocab - bits.shape[1], dtype=torch.bool)], dim=1)
