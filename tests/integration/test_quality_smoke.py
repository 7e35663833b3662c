"""The quality suite's smoke run: 2 items of every RULER task (and the arithmetic set)
through the real serving path (``kvrelay serve``: Ray pools, UCX, the HTTP API), with a
lossless and a lossy configuration. The full run is ``python -m bench.quality.suite``."""

from __future__ import annotations

import json

import pytest

from bench.quality import suite, tasks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_items_of_every_task_through_the_api(tmp_path):
    records = tmp_path / "records.jsonl"
    args = suite.parse_args(["--quick", "--configs", "none", "max", "--records", str(records)])
    res = suite.run(args, [])
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"none", "max"}
    n = 2 * len(tasks.TASKS)
    for r in rows.values():
        assert r["n"] == n and r["errors"] == 0, r
        assert {k.split("@")[0] for k in r["cells"]} == set(tasks.TASKS)
    # Every request ran, in the suite's order (lossy first, none last), and was scored.
    lines = [json.loads(x) for x in records.read_text().splitlines()]
    assert len(lines) == 2 * n and all(0.0 <= x["score"] <= 1.0 for x in lines)
    by_item: dict[str, list[str]] = {}
    for x in lines:
        by_item.setdefault(x["id"], []).append(x["config"])
    assert all(v == ["max", "none"] for v in by_item.values())
    # The bytes come from the workers' counters: none ships 32-bit KV (the cache dtype),
    # max a quarter of the tokens in int4.
    assert 0.45 < rows["none"]["ratio"] < 0.55 and rows["max"]["ratio"] > 6
    assert res["metrics"]["transfer_failures"].get("total", 0) == 0
