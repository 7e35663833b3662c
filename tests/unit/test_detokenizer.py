"""Incremental detokenization with the real SmolLM2 tokenizer (byte-level BPE) and
stop strings: streamed text equals the one-shot decode, never shows half a
character, never shows a stop string or a piece of one."""

from __future__ import annotations

import random

import pytest

from router.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopChecker, StopResult, TextDelta, TextStream

TEXTS = [
    "Hello world, this is a plain ASCII sentence.",
    "I am happy 🙂 today",
    "中文 and 日本語のテキスト",
    "café, naïve, résumé, é",
    "   leading spaces\n\n\tand tabs\n  trailing  ",
    "\nstarts with a newline",
    "rare characters split into byte tokens: 𝄞 ꙮ ᚠ 🦜 🫠 ǅ",
    "mixed 🙂中é𝄞 glued together🦜🦜",
]


def stream(detok: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    out = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    return out + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "User: say something.\nAssistant:"])
def test_token_by_token_equals_one_shot_decode(tokenizer, text, prompt):
    ids = tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt)), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert deltas[-1] == ""  # valid UTF-8: nothing was left for flush
    assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [2, 3, 7])
def test_several_tokens_per_step(tokenizer, text, step):
    ids = tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt")), ids, step)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)


def test_split_character_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("a🦜")
    assert len(ids) > 2  # the parrot is several byte tokens in SmolLM2
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)  # held back: half a character
    assert deltas[-1] == "🦜"
    assert detok.num_pending_tokens == 0


def test_a_batch_ending_mid_character_emits_its_whole_characters(tokenizer):
    ids = tokenizer.encode("ab 🦜")
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids[:-1]) == "ab"  # " " + the parrot's first bytes share a token: held with them
    assert detok.num_pending_tokens >= 1
    assert detok.add(ids[-1:]) == " 🦜"


def test_random_mixed_text_any_step(tokenizer):
    rng = random.Random(0)
    pool = list("abc xyz.,\n\t") + ["é", "ß", "中", "文", "語", "🙂", "🦜", "🫠", "𝄞", "ꙮ", "ᚠ", "ǅ", "  "]
    for _ in range(60):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        ids = tokenizer.encode(text)
        deltas = stream(IncrementalDetokenizer(tokenizer, tokenizer.encode(rng.choice(["", "Q: 🦜", "x"]))), ids, rng.randint(1, 5))
        assert "".join(deltas) == text
        assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("<|im_start|>assistant\nHi there<|im_end|>")
    deltas = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(deltas)) is not skip


def test_output_cut_mid_character_is_flushed_as_the_decoder_shows_it(tokenizer):
    ids = tokenizer.encode("ok 🦜")[:-1]  # max_tokens reached inside the character
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert not any(REPLACEMENT in d for d in deltas)
    tail = detok.flush()
    assert REPLACEMENT in tail
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_invalid_utf8_does_not_stall_the_stream(tokenizer):
    lead_byte = tokenizer.encode("𝄞")[0]  # the first byte of a 4-byte character, alone
    assert tokenizer.decode([lead_byte]) == REPLACEMENT
    ids = tokenizer.encode("x") + [lead_byte] * 20
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert detok.num_pending_tokens <= IncrementalDetokenizer.MAX_PENDING_TOKENS
    assert any(REPLACEMENT in d for d in deltas)  # emitted before the end
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids)


def test_work_per_token_is_bounded(tokenizer):
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    text = " ".join(TEXTS) * 5
    ids = tokenizer.encode(text)
    assert len(ids) > 300
    deltas = stream(IncrementalDetokenizer(counting, tokenizer.encode("a long prompt " * 50)), ids)
    assert "".join(deltas) == text
    assert counting.longest <= IncrementalDetokenizer.CONTEXT_TOKENS + 4  # context + one split character


# ---------------------------------------------------------------- StopChecker


def test_no_stop_strings_pass_everything():
    s = StopChecker([])
    assert s.add("abc") == StopResult("abc", False)
    assert s.flush() == ""


def test_stop_across_chunks_cuts_before_it():
    s = StopChecker(["world"])
    assert s.add("Hello wo") == ("Hello ", False)  # "wo" held: it may be the start of "world"
    assert s.held_text == "wo"
    assert s.add("rld, and more") == ("", True)
    assert s.matched == "world"
    assert s.add("anything") == ("", True)
    assert s.flush() == ""


def test_held_prefix_released_when_it_is_not_a_stop():
    s = StopChecker(["world"])
    assert s.add("Hello wo") == ("Hello ", False)
    assert s.add("ndrous w") == ("wondrous ", False)
    assert s.add("o") == ("", False)
    assert s.flush() == "wo"  # the output ended: held text was not a stop string
    assert not s.stopped


def test_earliest_of_several_stop_strings():
    s = StopChecker(["b", "END"])
    assert s.add("a END b") == ("a ", True)
    assert s.matched == "END"
    s = StopChecker(["###", "\n\n"])
    assert s.add("one\n") == ("one", False)
    assert s.add("#") == ("\n", False)  # "\n#": "\n" no longer starts "\n\n" but "#" may start "###"
    assert s.add("## x") == ("", True)
    assert s.matched == "###"


def test_overlapping_prefixes_hold_the_longest_possible_start():
    s = StopChecker(["aab"])
    assert s.add("xaa") == ("x", False)
    assert s.add("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert s.add("b") == ("", True)


def test_stop_at_the_very_start():
    s = StopChecker(["Hello"])
    assert s.add("Hel") == ("", False)
    assert s.add("lo there") == ("", True)


def test_stop_strings_must_be_non_empty():
    with pytest.raises(ValueError):
        StopChecker(["a", ""])


# ---------------------------------------------------------------- TextStream (tokens in, text out)


def run(ts: TextStream, ids: list[int]) -> tuple[list[TextDelta], TextDelta]:
    deltas = []
    for i in ids:
        deltas.append(ts.add([i]))
        if deltas[-1].stopped:
            break
    return deltas, ts.finish()


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("The answer is 42.\n\nQuestion: what next?", ["\n\nQuestion"], "The answer is 42."),
        ("I am happy 🙂 today and tomorrow", ["today", "🙂"], "I am happy "),
        ("rare 𝄞 ꙮ ᚠ 🦜 end", ["🦜"], "rare 𝄞 ꙮ ᚠ "),
        ("中文 and 日本語", ["日本"], "中文 and "),
        ("Hello world", ["Hello"], ""),
        ("Once upon a time, there was", ["upon a t", "there", "nowhere"], "Once "),
        ("no stop in this text at all", ["STOP", "xyz"], "no stop in this text at all"),
        ("ends with a partial sto", ["stop"], "ends with a partial sto"),
    ],
)
def test_text_stream_with_real_tokens(tokenizer, text, stops, expected):
    ids = tokenizer.encode(text)
    ts = TextStream(tokenizer, tokenizer.encode("Prompt:"), stops)
    deltas, last = run(ts, ids)
    sent = "".join(d.text for d in deltas) + last.text
    assert sent == expected == ts.text
    assert ts.stopped == (expected != text)
    for stop in stops:  # never sent, not even in part at the end of a delta stream
        assert stop not in sent
    assert not any(REPLACEMENT in d.text for d in deltas)


def test_text_stream_holds_a_stop_prefix_until_it_is_settled(tokenizer):
    ts = TextStream(tokenizer, [], ["world peace"])
    sent = ""
    for i in tokenizer.encode("Hello world"):
        sent += ts.add([i]).text
    assert sent == "Hello "  # "world" might become "world peace": held
    assert ts.finish() == TextDelta("world", False)
    assert ts.text == "Hello world"


def test_text_stream_ignores_tokens_after_a_stop(tokenizer):
    ts = TextStream(tokenizer, [], ["."])
    assert ts.add(tokenizer.encode("Yes. And")) == TextDelta("Yes", True)
    assert ts.matched_stop == "."
    assert ts.add(tokenizer.encode(" more")) == TextDelta("", True)
    assert ts.finish() == TextDelta("", True)
    assert ts.text == "Yes"
