"""The helpers that turn dashboards and alert rules into Prometheus queries."""

import pytest

from bench.prometheus import as_bool_comparison, substitute


@pytest.mark.parametrize(("expr", "want"), [
    ("kvrelay_worker_up == 0", "kvrelay_worker_up == bool 0"),
    ('max by (worker) (kvrelay_kv_cache_usage_ratio{role=~"decode|colocated"}) > 0.95',
     'max by (worker) (kvrelay_kv_cache_usage_ratio{role=~"decode|colocated"}) > bool 0.95'),
    ("sum(rate(a[5m])) / clamp_min(sum(rate(b[5m])) + sum(rate(c[5m])), 1e-9) >= 0.05",
     "sum(rate(a[5m])) / clamp_min(sum(rate(b[5m])) + sum(rate(c[5m])), 1e-9) >= bool 0.05"),
    ('x{a!="b"} < 3', 'x{a!="b"} < bool 3'),
    ("x > bool 1", "x > bool 1"),
])
def test_top_level_comparison_becomes_bool(expr, want):
    assert as_bool_comparison(expr) == want


@pytest.mark.parametrize("expr", ["sum(rate(x[5m]))", "a > 1 and b < 2", "(a > 1)"])
def test_needs_exactly_one_top_level_comparison(expr):
    with pytest.raises(ValueError, match="exactly one"):
        as_bool_comparison(expr)


def test_template_variables_are_substituted():
    values = {"__rate_interval": "1m", "ttft_slo": "1"}
    expr = 'rate(x_bucket{le="$ttft_slo"}[$__rate_interval]) / rate(x_count[${__rate_interval}])'
    assert substitute(expr, values) == 'rate(x_bucket{le="1"}[1m]) / rate(x_count[1m])'
    with pytest.raises(KeyError, match="worker"):
        substitute("x{worker=\"$worker\"}", values)
