"""Tokens in, text deltas out: incremental detokenization and stop strings, per choice.

    token ids ──► IncrementalDetokenizer ──► new text ──► StopChecker ──► text to send
                  (whole characters only)                 (never a stop string, nor
                                                           a prefix that may become one)

``TextStream`` composes the two; the router keeps one per choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing token sequence into the text each new token adds.

    Decoding a token alone is not the text it adds in context: a SentencePiece token
    loses its leading space at the start of a decode, and a byte-level token may be
    one byte of a multi-byte character. So each step decodes a small window twice,
    with and without the pending tokens, and emits the difference::

        _ids:  [ context (emitted) ........ | pending (not emitted yet) ]
                                            ^ _read_offset
        context_text = decode(_ids[:_read_offset])
        full_text    = decode(_ids)
        new text     = full_text[len(context_text):]

    The context is the last ``CONTEXT_TOKENS`` emitted tokens (at first, of the
    prompt); older ids are dropped, so work per token is bounded. Any window start
    works, even one inside a character, because both decodes share it.

    If ``full_text`` ends in U+FFFD the pending tokens stop mid-character: text is
    emitted through the last token that ends a whole character, and the rest (at
    most 3 tokens for valid UTF-8) waits for the rest of the character. Tokens that
    never complete a character (the model sampled invalid UTF-8) are emitted with
    U+FFFD past ``MAX_PENDING_TOKENS``, so the stream never stalls; ``flush`` emits
    whatever is pending at the end.

    Concatenating everything ``add`` and ``flush`` return gives
    ``tokenizer.decode(output_ids, skip_special_tokens)`` for byte-level BPE and
    SentencePiece tokenizers (the prompt tokens are context only).
    """

    CONTEXT_TOKENS = 5  # as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET
    MAX_PENDING_TOKENS = 8  # valid UTF-8 never leaves more than 3 pending (a character is <= 4 bytes)

    def __init__(
        self, tokenizer: _Decoder, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-self.CONTEXT_TOKENS :])
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens received whose text has not been emitted yet (an unfinished character)."""
        return len(self._ids) - self._read_offset

    def add(self, token_ids: Sequence[int]) -> str:
        """The text the new tokens add, up to the last whole character."""
        self._ids.extend(token_ids)
        context_text = self._decode(self._ids[: self._read_offset])
        # Emit through the longest run of pending tokens that ends on a whole character.
        # The start of an unfinished character is at most 3 bytes, so at most 3 tokens.
        for end in range(len(self._ids), max(self._read_offset, len(self._ids) - 4), -1):
            text = self._decode(self._ids[:end])
            if len(text) > len(context_text) and not text.endswith(REPLACEMENT):
                return self._emit(text[len(context_text) :], end)
        if self.num_pending_tokens > self.MAX_PENDING_TOKENS:
            return self.flush()  # not UTF-8 that can still complete (or only skipped special tokens)
        return ""

    def flush(self) -> str:
        """At the end of the output: the text of pending tokens, U+FFFD and all."""
        if not self.num_pending_tokens:
            return ""
        context_text = self._decode(self._ids[: self._read_offset])
        return self._emit(self._decode(self._ids)[len(context_text) :], len(self._ids))

    def _emit(self, text: str, end: int) -> str:
        """_ids[:end] are emitted; the last CONTEXT_TOKENS of them stay as context."""
        del self._ids[: max(0, end - self.CONTEXT_TOKENS)]
        self._read_offset = min(end, self.CONTEXT_TOKENS)
        return text


class StopResult(NamedTuple):
    text: str  # safe to send now
    stopped: bool  # a stop string was found; text ends right before it


class StopChecker:
    """Finds the earliest stop string in incrementally arriving text.

    Text that could be the start of a stop string is held back until the following
    text settles it, so a stream never sends part of a stop string. The stop string
    itself and everything after it are dropped. Holding back the longest tail that
    is a prefix of some stop string is enough to find a match at its true start: a
    match starting at p keeps the text from p on held until it completes.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.stop_strings = tuple(dict.fromkeys(stop_strings))
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    @property
    def held_text(self) -> str:
        return self._held

    def add(self, text: str) -> StopResult:
        if self.stopped:
            return StopResult("", True)
        if not self.stop_strings:
            return StopResult(text, False)
        buf = self._held + text
        start, matched = min(((i, s) for s in self.stop_strings if (i := buf.find(s)) >= 0), default=(-1, None))
        if matched is not None:
            self._held = ""
            self.matched = matched
            return StopResult(buf[:start], True)
        hold = self._partial_stop_len(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return StopResult(buf[: len(buf) - hold], False)

    def flush(self) -> str:
        """At the end of the output: the held text (it did not become a stop string)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self.stop_strings) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text to send (may be "")
    stopped: bool  # a stop string ended the choice; finish_reason "stop"


class TextStream:
    """One choice's text: ``add`` the sampled tokens as they come, ``finish`` when the
    engine ends the choice. After a stop string, further tokens are ignored (the
    router aborts the engine request)."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self._stop = StopChecker(stop_strings)
        self._sent: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def matched_stop(self) -> str | None:
        return self._stop.matched

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return "".join(self._sent)

    def add(self, token_ids: Sequence[int]) -> TextDelta:
        if self.stopped:
            return TextDelta("", True)
        return self._send(self._stop.add(self._detok.add(token_ids)))

    def finish(self) -> TextDelta:
        """Flush what was held (an unfinished character, a possible stop prefix)."""
        if self.stopped:
            return TextDelta("", True)
        result = self._stop.add(self._detok.flush())
        if not result.stopped:
            result = StopResult(result.text + self._stop.flush(), False)
        return self._send(result)

    def _send(self, result: StopResult) -> TextDelta:
        if result.text:
            self._sent.append(result.text)
        return TextDelta(result.text, result.stopped)
