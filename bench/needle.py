"""A small RULER-style needle-in-a-haystack set (niah_single), generated
deterministically from a seed: no downloads.

    items = needle_items(tokenizer, n_items=20, length=1024, seed=0)
    item.messages(uid)    # the chat messages, a unique id first (no shared prefix)
    item.correct(text)    # the needle's number appears in the output

Each item: a haystack of ``length`` tokens (chat-templated prompt, +-1 sentence) with
one needle, "One of the special magic numbers for <word> is: <7-digit number>.",
inserted at a sentence boundary at a depth drawn uniformly from ``depths``; the
question at the end asks for the number of <word> (RULER's wording). Haystacks:

  noise   RULER's repeated sentence ("The grass is green. The sky is blue. ...")
  essay   essay-like prose: sentences built from a fixed vocabulary by a seeded RNG
          (grammatical, topical, repetitive at the phrase level, never at the sentence
          level), so the needle is not the only sentence that differs from the rest.

The unique id goes into the system message (``[session <uid>]`` before SmolLM2's
default system text), inside the first 16-token block, so two prompts of the same item
under different ids share no KV block.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.")
QUESTION = "What is the special magic number for {word} mentioned in the provided text?"
NEEDLE = "One of the special magic numbers for {word} is: {number}."
SYSTEM = "[session {uid}] You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# RULER keys are word pairs ("wonderful-jellyfish"); a fixed list, seeded draws.
_ADJ = ("ancient", "bitter", "brave", "calm", "clever", "curious", "damp", "eager", "fancy", "fierce", "gentle",
        "glossy", "grumpy", "hollow", "jolly", "lazy", "lively", "lucky", "mighty", "noisy", "odd", "polite",
        "quiet", "rapid", "rusty", "shiny", "silent", "sleepy", "smooth", "sour", "spicy", "steady", "sturdy",
        "swift", "tender", "tidy", "wild", "witty", "wooden", "zealous")
_NOUN = ("anchor", "badger", "barrel", "beacon", "biscuit", "canyon", "castle", "cobra", "comet", "dolphin",
         "falcon", "ferret", "forest", "garden", "glacier", "harbor", "jellyfish", "kettle", "lantern", "meadow",
         "mirror", "nectar", "orchid", "otter", "pebble", "pepper", "puzzle", "quartz", "rabbit", "raven",
         "saddle", "sparrow", "teapot", "thistle", "tiger", "tulip", "violin", "walrus", "willow", "zebra")

# essay haystack: subject / verb phrase / object / tail, recombined per sentence
_SUBJ = ("The village council", "A travelling merchant", "The old lighthouse keeper", "Every spring the farmers",
         "The river", "A group of students", "The museum curator", "Most sailors", "The baker on the corner",
         "The mountain guide", "Our neighbours", "The archive", "A quiet librarian", "The town band",
         "The railway company", "Several historians", "The weather", "The harbour master", "A young painter",
         "The committee")
_VERB = ("carefully repaired", "argued about", "wrote a long letter about", "slowly forgot", "often visited",
         "tried to describe", "never understood", "collected stories about", "measured", "painted",
         "kept a record of", "complained about", "celebrated", "walked past", "studied", "rebuilt",
         "sold tickets for", "photographed", "talked for hours about", "planned a festival around")
_OBJ = ("the stone bridge", "the northern fields", "the broken clock tower", "the winter market", "the old mill",
        "the narrow streets", "the harvest", "the coastal road", "the abandoned quarry", "the public gardens",
        "the school library", "the fishing boats", "the hill above the town", "the long drought",
        "the copper mine", "the summer storms", "the first railway station", "the flooded meadow",
        "the chapel bells", "the lighthouse lamp")
_TAIL = ("before the first snow.", "in the early morning.", "for reasons nobody remembers.", "with great patience.",
         "while the tide was out.", "as their parents had done.", "during the long evenings.",
         "without telling anyone.", "after the war.", "in a small notebook.", "once every decade.",
         "to everyone's surprise.", "despite the rain.", "under a grey sky.", "with the help of a map.",
         "and then went home.", "for the third time that year.", "at the edge of the forest.",
         "as the bells rang.", "in a language few could read.")

HAYSTACKS = ("noise", "essay")


@dataclass(frozen=True)
class NeedleItem:
    index: int
    length: int  # target prompt tokens
    haystack: str  # "noise" | "essay"
    word: str
    number: str  # 7 digits
    depth: float  # where the needle sits, as a fraction of the haystack sentences
    context: str  # the haystack with the needle in it
    prompt_tokens: int = 0  # chat-templated, with a uid of the bench's width
    meta: dict = field(default_factory=dict)

    def user_message(self) -> str:
        return f"{INSTRUCTION}\n{self.context}\n{QUESTION.format(word=self.word)}"

    def messages(self, uid: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM.format(uid=uid)}, {"role": "user", "content": self.user_message()}]

    def correct(self, text: str) -> bool:
        """The needle's number appears in the output (digits only, so "1 234 567" or
        "1,234,567" count too, a longer digit run containing it does not)."""
        digits = re.sub(r"(?<=\d)[ ,.](?=\d)", "", text)
        return re.search(rf"(?<!\d){self.number}(?!\d)", digits) is not None


def _essay_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_TAIL)}"


def _sentences(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "noise":
        return [NOISE] * n
    if kind == "essay":
        return [_essay_sentence(rng) for _ in range(n)]
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")


def needle_items(tokenizer, n_items: int, length: int, seed: int = 0, haystack: str = "noise",
                 depths: tuple[float, float] = (0.1, 0.9), uid_width: int = 6) -> list[NeedleItem]:
    """``n_items`` items of ~``length`` chat-templated tokens each (``tokenizer``: the
    router's Tokenizer, with apply_chat_template). Deterministic in (seed, length,
    haystack). Depths are drawn uniformly from ``depths``, distinct words per set."""
    rng = random.Random(f"{seed}-{length}-{haystack}")
    words = [f"{a}-{b}" for a in _ADJ for b in _NOUN]
    rng.shuffle(words)
    uid = "0" * uid_width
    overhead = None
    items = []
    for i in range(n_items):
        word = words[i]
        number = str(rng.randint(1_000_000, 9_999_999))
        depth = rng.uniform(*depths)
        needle = NEEDLE.format(word=word, number=number)
        # a generous pool of sentences; trimmed to the token target below
        pool = _sentences(haystack, rng, max(8, length // 4))
        if overhead is None:
            probe = NeedleItem(i, length, haystack, word, number, depth, needle)
            overhead = len(tokenizer.apply_chat_template(probe.messages(uid)))
        per = max(1, len(tokenizer.encode(" ".join(pool[:20]))) / 20)
        n = max(2, int((length - overhead) / per))

        def build(n_sent: int) -> tuple[str, float]:
            sents = list(pool[:n_sent])
            at = round(depth * n_sent)
            sents.insert(at, needle)
            return " ".join(sents), at / max(1, n_sent)

        # adjust the sentence count until the templated prompt is as close to the target as one sentence allows
        for _ in range(8):
            ctx, real_depth = build(n)
            item = NeedleItem(i, length, haystack, word, number, real_depth, ctx)
            got = len(tokenizer.apply_chat_template(item.messages(uid)))
            step = round((length - got) / per)
            if step == 0 or n + step < 2 or n + step > len(pool):
                break
            n += step
        items.append(NeedleItem(i, length, haystack, word, number, real_depth, ctx, prompt_tokens=got))
    return items


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% for z=1.96); (0, 1) for n=0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return max(0.0, mid - half), min(1.0, mid + half)
