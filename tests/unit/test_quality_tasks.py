"""The quality suite's items (bench.quality.tasks): RULER's generators from the
nvidia-long-context-eval package, run offline. No model inference: tokenizer only."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from bench.quality import tasks as T

N = 3


def _length(task: str) -> int:
    return T.ARITH_LENGTH if task == "arith" else 1024


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("quality-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVRELAY_QUALITY_CACHE", str(root))
        T.tokenizer_dir(tokenizer)  # the session's tokenizer, not a second load of the GGUF
        yield root


@pytest.fixture(scope="module")
def suite(cache):
    """Every task, both splits, at 1024 (arith: its own length), n=3, seed 0: one worker."""
    jobs = [(t, _length(t), N, s, 0) for t in T.TASKS for s in T.SPLITS]
    return dict(zip([(t, s) for t, _, _, s, _ in jobs], T.generate_many(jobs)))


def test_items_are_well_formed(suite):
    for (task, split), items in suite.items():
        assert len(items) == N
        assert len({i.id for i in items}) == N
        for i in items:
            assert (i.task, i.split, i.length) == (task, split, _length(task))
            assert i.metric == T.METRIC[task] and i.max_tokens == T.MAX_TOKENS[task] <= 64
            assert i.answers and all(isinstance(a, str) and a for a in i.answers)
            assert task in i.id and T._SPLIT_SHORT[split] in i.id


def test_ruler_content(suite):
    needle = re.compile(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.")
    for split in T.SPLITS:
        for i in suite["niah_single", split]:
            found = needle.findall(i.user)
            assert len(found) == 1 and found[0][1] == i.answers[0]
            question = f"What is the special magic number for {found[0][0]} mentioned in the provided text?"
            assert i.user.endswith(question)
        for i in suite["niah_multikey", split]:
            found = dict(needle.findall(i.user))
            assert len(found) == 4
            key = re.search(r"magic number for ([\w-]+) mentioned in the provided text\?$", i.user).group(1)
            assert found[key] == i.answers[0]
        for i in suite["vt", split]:
            assert len(i.answers) == 5 and all(f"VAR {v} =" in i.user for v in i.answers)
            assert i.user.endswith("in the text above.")  # the answer prefix is dropped
            assert i.user.count("Question: Find all variables") == 2  # RULER's solved example first
        for task in ("qa_squad", "qa_hotpot"):
            for i in suite[task, split]:
                assert "Document 1:" in i.user and re.search(r"\n\nQuestion: [^\n]+$", i.user)
        for i in suite["qa_squad", split]:
            assert any(a in i.user for a in i.answers)
        for i in suite["arith", split]:
            a, op, b = re.search(r"Q: (\d+) ([+-]) (\d+) = \?$", i.user).groups()
            assert int(i.answers[0]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert i.user.count("\nA: ") >= 20  # many solved examples: long enough to compress


def test_prompts_within_budget(suite, tokenizer):
    """The chat-templated prompt (system + user + generation prompt) plus the generation
    budget fits in the item's length, with the serving tokenizer and template."""
    for items in suite.values():
        for i in items:
            n = len(tokenizer.apply_chat_template(T.messages(i)))
            assert n + i.max_tokens <= i.length, (i.id, n)
            if not i.task.startswith("qa_"):  # documents are coarse; the rest fills the budget
                assert n + i.max_tokens >= 0.9 * i.length, (i.id, n)


def test_no_two_items_share_the_first_kv_block(suite, tokenizer):
    firsts = {}
    for items in suite.values():
        for i in items:
            ids = tuple(tokenizer.apply_chat_template(T.messages(i))[:16])
            assert ids not in firsts, (i.id, firsts.get(ids))
            firsts[ids] = i.id


def test_messages(suite):
    i = suite["vt", "evaluation"][0]
    assert T.messages(i) == [
        {"role": "system",
         "content": f"[item {i.id}] You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
        {"role": "user", "content": i.user},
    ]


def test_splits_are_disjoint(suite):
    for task in T.TASKS:
        T.assert_disjoint(suite[task, "calibration"], suite[task, "evaluation"])


def test_assert_disjoint_raises_on_overlap(suite):
    cal, ev = suite["niah_single", "calibration"], suite["niah_single", "evaluation"]
    with pytest.raises(ValueError, match="same user text"):
        T.assert_disjoint(cal, [*ev, dataclasses.replace(cal[1], id="other")])
    with pytest.raises(ValueError, match="share answers"):  # the same needle in another haystack
        T.assert_disjoint(cal, [dataclasses.replace(ev[0], answers=cal[2].answers)])
    qa_cal, qa_ev = suite["qa_squad", "calibration"], suite["qa_squad", "evaluation"]
    question = qa_cal[0].user.rsplit("Question:", 1)[1]
    moved = dataclasses.replace(qa_ev[0], user=qa_ev[0].user.rsplit("Question:", 1)[0] + "Question:" + question)
    with pytest.raises(ValueError, match="share question"):
        T.assert_disjoint(qa_cal, [moved])
    # short answers recur across different questions: not an overlap
    T.assert_disjoint(qa_cal, [dataclasses.replace(qa_ev[0], answers=qa_cal[0].answers)])
    ar_cal, ar_ev = suite["arith", "calibration"], suite["arith", "evaluation"]
    T.assert_disjoint(ar_cal, [dataclasses.replace(ar_ev[0], answers=ar_cal[0].answers)])
    q = ar_cal[0].user.rsplit("Q:", 1)[1]
    with pytest.raises(ValueError, match="share question"):
        T.assert_disjoint(ar_cal, [dataclasses.replace(ar_ev[0], user=ar_ev[0].user.rsplit("Q:", 1)[0] + "Q:" + q)])


def test_deterministic_for_a_seed(suite, cache, tmp_path, monkeypatch):
    """A fresh cache makes the same items for seed 0 and other ones for seed 1; a second
    call is served from the cache without running the generators."""
    fresh = tmp_path / "fresh"
    shutil.copytree(cache / "tokenizer", fresh / "tokenizer")  # only the items are fresh
    monkeypatch.setenv("KVRELAY_QUALITY_CACHE", str(fresh))
    tasks = ("niah_single", "vt", "qa_squad", "arith")
    jobs = [(t, _length(t), N, "evaluation", seed) for seed in (0, 1) for t in tasks]
    out = T.generate_many(jobs)
    for task, again, other in zip(tasks, out[: len(tasks)], out[len(tasks):]):
        assert again == suite[task, "evaluation"]
        assert not {i.user for i in other} & {i.user for i in again}
        assert [i.answers for i in other] != [i.answers for i in again]

    def no_worker(*a, **k):
        raise AssertionError("the cache should have served this")

    monkeypatch.setattr(T.subprocess, "run", no_worker)
    assert T.generate("vt", 1024, N, "evaluation", seed=1) == out[len(tasks) + 1]


def test_jsonl_round_trip(suite, tmp_path):
    items = [i for items in suite.values() for i in items]
    path = tmp_path / "items.jsonl"
    T.write_jsonl(items, path)
    assert T.read_jsonl(path) == items
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["messages"] == T.messages(items[0])
    assert set(rows[0]) == {f.name for f in dataclasses.fields(T.QualityItem)} | {"messages"}


def _item(metric: str, answers: tuple[str, ...]) -> T.QualityItem:
    return T.QualityItem("x", "t", 1024, "evaluation", "u", answers, metric, 32)


def test_score_all():
    i = _item("all", ("ABCDE", "FGHIJ", "KLMNO", "PQRST"))
    assert T.score(i, "They are: abcde, FGHIJ and KLMNO.") == 0.75
    assert T.score(i, "ABCDE FGHIJ KLMNO PQRST") == 1.0
    assert T.score(i, "none") == 0.0
    assert T.score(_item("all", ("1234567",)), "The special magic number is 1234567.") == 1.0
    assert T.score(_item("all", ("1234567",)), "The special magic number is 123456.") == 0.0


def test_score_part():
    i = _item("part", ("Denmark, Iceland and Norway", "Norway"))
    assert T.score(i, "norway") == 1.0
    assert T.score(i, "Sweden") == 0.0


def test_score_exact():
    i = _item("exact", ("85",))
    assert T.score(i, "85") == 1.0
    assert T.score(i, "A: 85.") == 1.0
    assert T.score(i, "850") == 0.0
    assert T.score(i, "37 + 48 = 85") == 0.0  # the first integer counts
    assert T.score(i, "eighty-five") == 0.0
    assert T.score(_item("exact", ("-3",)), "-3") == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        T.generate("niah", 1024, 1, "evaluation")
    with pytest.raises(ValueError, match="unknown split"):
        T.generate("vt", 1024, 1, "test")


def test_missing_package_names_the_install_command(monkeypatch):
    real = T.importlib.util.find_spec
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None if name == "long_context_eval" else real(name))
    with pytest.raises(ModuleNotFoundError, match=re.escape(T.INSTALL)):
        T.generate("vt", 1024, 1, "evaluation")
