"""Pure logic of the kvpress reference (bench/quality/kvpress_ref.py): config parsing, kvpress's n_kept
arithmetic, and the resume bookkeeping. CI-light: it never creates the kvpress venv nor runs a model, and
kvpress_ref's top level imports only the standard library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.quality import kvpress_ref as ref


def test_module_imports_without_torch_or_kvpress() -> None:
    import subprocess

    code = ("import sys, bench.quality.kvpress_ref\n"
            "bad = [m for m in ('torch', 'transformers', 'kvpress') if m in sys.modules]\n"
            "assert not bad, bad")
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_parse_configs_adds_full_first_and_names() -> None:
    cs = ref.parse_configs('[{"keep": 0.25, "window": 32, "kernel": 63},'
                           ' {"name": "k5", "keep": 0.25, "window": 32, "kernel": 5}]')
    assert [c["name"] for c in cs] == ["full", "kvpress-snapkv-k63-keep0.25", "k5"]
    assert cs[0] == {"name": "full", "keep": None, "window": None, "kernel": None}
    assert cs[2] == {"name": "k5", "keep": 0.25, "window": 32, "kernel": 5}
    assert ref.config_name(0.1, 64, 5) == "kvpress-snapkv-k5-keep0.1-w64"


def test_parse_configs_full_given_or_suppressed() -> None:
    cs = ref.parse_configs([{"keep": 0.5, "window": 16, "kernel": 7}, {"name": "full"}])
    assert [c["name"] for c in cs] == ["kvpress-snapkv-k7-keep0.5-w16", "full"]  # not added twice
    assert [c["name"] for c in ref.parse_configs([{"keep": 0.5, "window": 16, "kernel": 7}], add_full=False)] == [
        "kvpress-snapkv-k7-keep0.5-w16"]


@pytest.mark.parametrize("bad", [
    '{"keep": 0.25}',                                       # not a list
    '[{"keep": 0.25, "window": 32}]',                       # no silent kernel default
    '[{"keep": 0, "window": 32, "kernel": 63}]',
    '[{"keep": 1.5, "window": 32, "kernel": 63}]',
    '[{"keep": 0.25, "window": 0, "kernel": 63}]',
    '[{"keep": 0.25, "window": 32, "kernel": 4}]',          # even kernel
    '[{"keep": 0.25, "window": 32, "kernel": 63, "ratio": 0.75}]',
    '[{"name": "full", "keep": 0.5}]',
    '[{"name": "a", "keep": 0.5, "window": 8, "kernel": 3}, {"name": "a", "keep": 0.2, "window": 8, "kernel": 3}]',
])
def test_parse_configs_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        ref.parse_configs(bad)


def test_expected_n_kept_follows_kvpress_float_arithmetic() -> None:
    assert ref.expected_n_kept(600, 0.25) == 150
    assert ref.expected_n_kept(600, 0.1) == 59   # int(600 * (1 - 0.9)) = int(59.99...)
    assert ref.expected_n_kept(3, 0.1) == 1      # compute_n_kept clamps to >= 1
    assert ref.expected_n_kept(600, 1.0) == 600  # ratio 0: cache untouched
    assert ref.expected_n_kept(600, None) == 600


def test_load_items_validates(tmp_path) -> None:
    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps({"id": 1, "messages": [], "max_tokens": 4}) + "\n\n"
                 + json.dumps({"id": "b", "prompt_ids": [1, 2], "max_tokens": 2}) + "\n")
    assert [it["id"] for it in ref.load_items(p)] == [1, "b"]
    for row in ({"id": 1, "max_tokens": 4}, {"id": 1, "messages": [], "max_tokens": 0}, {"messages": []}):
        p.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError):
            ref.load_items(p)
    p.write_text((json.dumps({"id": 1, "messages": [], "max_tokens": 4}) + "\n") * 2)
    with pytest.raises(ValueError, match="duplicate"):
        ref.load_items(p)


def test_resume_skips_done_pairs_and_survives_a_torn_line(tmp_path) -> None:
    out = tmp_path / "preds.jsonl"
    assert ref.done_pairs(out) == set()
    ref.append_row(out, {"id": 1, "config": "full", "text": "x"})
    with open(out, "a") as f:
        f.write('{"id": 1, "config": "kvpress-snap')  # a run killed mid-write
    assert ref.done_pairs(out) == {("1", "full")}
    ref.append_row(out, {"id": 2, "config": "full", "text": "y"})
    assert ref.done_pairs(out) == {("1", "full"), ("2", "full")}
    assert json.loads(out.read_text().splitlines()[-1])["id"] == 2  # the torn line did not swallow it

    items = [{"id": 1}, {"id": 2}, {"id": 3}]
    configs = ref.parse_configs([{"name": "s", "keep": 0.25, "window": 32, "kernel": 63}])
    todo = ref.pending(items, configs, ref.done_pairs(out))
    assert [(it["id"], [c["name"] for c in cs]) for it, cs in todo] == [(1, ["s"]), (2, ["s"]), (3, ["full", "s"])]
    assert ref.pending(items, configs, {(str(i), c) for i in (1, 2, 3) for c in ("full", "s")}) == []
