"""The Prometheus scrape config and alert rules, checked offline with the real promtool.

Besides promtool's own checks and unit tests (deploy/prometheus/alerts.test.yml), every
alert must read `<quantity> <op> <threshold>` with one top-level comparison: the live
test rewrites `<op>` to `<op> bool` to see the quantity on a real cluster. Here the same
rewrite runs on the unit tests' healthy-cluster series, where every quantity must exist
and be below its threshold."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
CONFIG, RULES, RULE_TESTS = PROM / "prometheus.yml", PROM / "alerts.yml", PROM / "alerts.test.yml"

ALERTS = {"KVRelayWorkerDown", "KVRelayTargetDown", "KVRelayTTFTHigh", "KVRelayTransferFailures",
          "KVRelayKVCacheNearlyFull"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian package `prometheus`: make system-deps)"
)


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


# -- one top-level comparison ------------------------------------------------------------

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_OPEN, _CLOSE = "([{", ")]}"


def top_level_comparisons(expr: str) -> list[tuple[int, str]]:
    """(offset, operator) of every comparison outside parentheses, brackets, braces and
    string literals (so `=~` / `!~` in label matchers never count)."""
    found, depth, i = [], 0, 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            end = i + 1
            while expr[end] != c:
                end += 2 if expr[end] == "\\" and c != "`" else 1
            i = end + 1
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is not None:
                found.append((i, op))
                i += len(op)
                continue
        i += 1
    return found


def split_alert(expr: str) -> tuple[str, str, float]:
    """`<quantity> <op> <threshold>` -> (quantity, op, threshold)."""
    (at, op), = top_level_comparisons(expr)
    return expr[:at].strip(), op, float(expr[at + len(op):].strip())


def test_comparison_parser():
    def ops(expr):
        return [op for _, op in top_level_comparisons(expr)]

    assert ops('sum(rate(x{a=~"b|c", d!="e"}[5m])) / clamp_min(y, 1) > 0.05') == [">"]
    assert ops("a >= 1 and b != 2") == [">=", "!="]
    assert ops('x{le="<=1"} == 0') == ["=="]
    assert ops('histogram_quantile(0.99, sum by (le) (rate(x[5m]))) < 2') == ["<"]
    assert split_alert("max by (w) (up) == 0") == ("max by (w) (up)", "==", 0.0)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_is_one_comparison_with_a_number(rule):
    comparisons = top_level_comparisons(rule["expr"])
    assert len(comparisons) == 1, f"{rule['alert']}: top-level comparisons {comparisons} in {rule['expr']!r}"
    quantity, _op, _threshold = split_alert(rule["expr"])  # raises if the threshold is not a number
    assert quantity and not re.search(r"\bbool\b", rule["expr"])


def test_alerts_are_the_documented_ones():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert {"summary", "description"} <= set(r["annotations"]), r["alert"]
    by_name = {r["alert"]: r for r in rules}
    assert by_name["KVRelayWorkerDown"]["labels"]["severity"] == "critical"
    assert by_name["KVRelayWorkerDown"]["for"] == "1m"
    # The router's own death: `up` of the scrape job (the chart's monitors set the same
    # job label), not a kvrelay series that vanishes with the router.
    target_down = by_name["KVRelayTargetDown"]
    assert (target_down["labels"]["severity"], target_down["for"]) == ("critical", "1m")
    assert split_alert(target_down["expr"]) == ('up{job="kvrelay"}', "==", 0.0)
    job, = [j["job_name"] for j in yaml.safe_load(CONFIG.read_text())["scrape_configs"]]
    assert f'job="{job}"' in target_down["expr"]
    assert split_alert(by_name["KVRelayTTFTHigh"]["expr"])[1:] == (">", 2.0)
    assert split_alert(by_name["KVRelayTransferFailures"]["expr"])[1:] == (">", 0.05)
    assert split_alert(by_name["KVRelayKVCacheNearlyFull"]["expr"])[1:] == (">", 0.95)


def test_unit_tests_cover_firing_and_quiet():
    """alerts.test.yml sees every alert both fire and stay quiet."""
    fired, quiet = set(), set()
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for t in group.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert fired == ALERTS and quiet == ALERTS


# -- promtool ----------------------------------------------------------------------------

@needs_promtool
def test_promtool_check_config():
    r = promtool("check", "config", str(CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_check_rules():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests():
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alert_quantities_on_a_healthy_cluster(tmp_path):
    """`<quantity> <op> bool <threshold>` on the healthy cluster's series: present (an
    empty result would mean the alert can never fire) and 0 everywhere (quiet). The
    series include `up` for every scraped process, as Prometheus itself records it."""
    healthy = next(g for g in yaml.safe_load(RULE_TESTS.read_text())["tests"] if g.get("name") == "healthy cluster")
    up = [s["series"] for s in healthy["input_series"] if s["series"].startswith("up{")]
    assert up and all('job="kvrelay"' in s for s in up)
    checks = []
    for rule in alert_rules():
        quantity, op, threshold = split_alert(rule["expr"])
        checks.append({
            "expr": f"max(({quantity}) {op} bool {threshold!r})",
            "eval_time": "10m",
            "exp_samples": [{"labels": "{}", "value": 0}],
        })
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [{"interval": healthy["interval"], "input_series": healthy["input_series"], "promql_expr_test": checks}],
    }
    path = tmp_path / "healthy.test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False))
    r = promtool("test", "rules", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
