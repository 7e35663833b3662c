"""The Grafana dashboards: Grafana's own schema, the generator, and every query against the
metric contract (names, labels, label values, template variables).

The last test replays what the live test does on a real cluster, offline: every query,
with $__rate_interval = 1m and the SLO variables at their current values, must return
a series on a synthetic healthy cluster that exports exactly the contract's series (and
no more: e.g. only the senders, prefill workers, export transfer bytes, and only under
the default preset "none"; no sparse payload has been observed yet, no compression fallen
back), evaluated by real promtool."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client.utils import floatToGoString

# Label values and buckets come from the code that exports them (one source for the contract).
from cluster.compression import PRESETS
from router.metrics import ADMISSION_REJECTIONS, COST_BUCKETS, E2E_BUCKETS, ITL_BUCKETS, STATUSES, TTFT_BUCKETS, WAIT_BUCKETS
from router.placement import COST_PARTS
from workers.metrics import FALLBACK_REASONS, KEPT_FRACTION_BUCKETS, QUEUE_TIME_BUCKETS, TRANSFER_BUCKETS
from workers.metrics import TRANSFER_FAILURE_REASONS as REASONS

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
HELM_DASHBOARDS = ROOT / "helm" / "kvrelay" / "dashboards"
BUILDER = GRAFANA / "build_dashboards.py"
# Grafana's dashboard schema, vendored (see tests/deploy/schemas/README.md).
SCHEMA = Path(__file__).resolve().parent / "schemas" / "grafana" / "dashboard.schema.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ALLOWED_EXPR_VARIABLES = {"__rate_interval", "ttft_slo", "itl_slo"}
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline"}

# -- the metric contract (issue 5) -------------------------------------------------------

ROUTER = "router"
ROLES = ("prefill", "decode", "colocated")
POOLS = ("prefill", "decode", "colocated")
# The preset label: a preset's name, or "<name>*" for the deployment's default with overrides.
PRESET_LABELS = (*PRESETS, *(f"{p}*" for p in PRESETS))
SPARSE_PRESETS = tuple(p for p, s in PRESETS.items() if s.sparse)
# Senders of KV payloads: prefill workers, and colocated ones running a compressing preset
# against themselves (in process). Decode workers' byte series stay at 0.
SENDERS = ("prefill", "colocated")


@dataclass(frozen=True)
class Metric:
    kind: str  # counter | gauge | histogram
    exported_by: tuple[str, ...]  # ("router",) or the worker roles whose processes export it
    labels: tuple[str, ...] = ()  # besides role/worker on worker series and le on buckets
    buckets: tuple[float, ...] = ()
    # label -> the values exported from the start (at 0), where they differ from LABEL_VALUES'
    initial: dict[str, tuple[str, ...]] = field(default_factory=dict)
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label -> every legal value, if not LABEL_VALUES'


ALL_WORKERS = ROLES
CONTRACT = {
    # router process
    "kvrelay_requests_total": Metric("counter", (ROUTER,), ("status",)),
    "kvrelay_time_to_first_token_seconds": Metric("histogram", (ROUTER,), buckets=TTFT_BUCKETS),
    "kvrelay_inter_token_latency_seconds": Metric("histogram", (ROUTER,), buckets=ITL_BUCKETS),
    "kvrelay_e2e_request_latency_seconds": Metric("histogram", (ROUTER,), buckets=E2E_BUCKETS),
    "kvrelay_prompt_tokens_total": Metric("counter", (ROUTER,)),
    "kvrelay_generation_tokens_total": Metric("counter", (ROUTER,)),
    "kvrelay_router_predicted_hit_tokens_total": Metric("counter", (ROUTER,)),
    "kvrelay_router_decisions_total": Metric("counter", (ROUTER,), ("policy", "worker")),
    "kvrelay_router_placement_cost": Metric("histogram", (ROUTER,), ("policy", "part"), buckets=COST_BUCKETS,
                                            values={"part": COST_PARTS}),
    "kvrelay_router_index_blocks": Metric("gauge", (ROUTER,), ("pool",)),
    "kvrelay_router_index_evictions_total": Metric("counter", (ROUTER,), ("pool",)),
    "kvrelay_worker_up": Metric("gauge", (ROUTER,), ("role", "worker")),
    "kvrelay_worker_restarts_total": Metric("counter", (ROUTER,), ("role", "worker")),
    "kvrelay_admission_queue_depth": Metric("gauge", (ROUTER,), ("pool",)),
    "kvrelay_admission_wait_seconds": Metric("histogram", (ROUTER,), ("pool",), buckets=WAIT_BUCKETS),
    "kvrelay_admission_rejections_total": Metric("counter", (ROUTER,), ("pool", "reason"),
                                                 values={"reason": ADMISSION_REJECTIONS}),
    "kvrelay_request_migrations_total": Metric("counter", (ROUTER,)),
    "kvrelay_request_retries_total": Metric("counter", (ROUTER,)),
    # worker processes (every series labelled role, worker)
    "kvrelay_request_queue_time_seconds": Metric("histogram", ALL_WORKERS, buckets=QUEUE_TIME_BUCKETS),
    "kvrelay_prefix_cache_query_tokens_total": Metric("counter", ALL_WORKERS),
    "kvrelay_prefix_cache_hit_tokens_total": Metric("counter", ALL_WORKERS),
    "kvrelay_prefix_cache_hash_mismatches_total": Metric("counter", ALL_WORKERS),
    "kvrelay_prefill_computed_tokens_total": Metric("counter", ALL_WORKERS),
    "kvrelay_kv_cache_usage_ratio": Metric("gauge", ALL_WORKERS),
    "kvrelay_running_requests": Metric("gauge", ALL_WORKERS),
    "kvrelay_waiting_requests": Metric("gauge", ALL_WORKERS),
    "kvrelay_preemptions_total": Metric("counter", ALL_WORKERS),
    # Bytes per compression preset; only "none" exists from the start.
    "kvrelay_kv_transfer_bytes_total": Metric("counter", SENDERS, ("preset",), initial={"preset": ("none",)}),
    "kvrelay_kv_transfer_full_bytes_total": Metric("counter", SENDERS, ("preset",), initial={"preset": ("none",)}),
    "kvrelay_kv_transfer_full_16bit_bytes_total": Metric("counter", SENDERS, ("preset",),
                                                         initial={"preset": ("none",)}),
    "kvrelay_kv_compression_fallbacks_total": Metric("counter", ALL_WORKERS, ("reason",),
                                                     values={"reason": FALLBACK_REASONS}),
    # Observed per sparse handoff; exported (empty) from the start under every sparse preset.
    "kvrelay_kv_compression_kept_ratio": Metric("histogram", SENDERS, ("preset",), buckets=KEPT_FRACTION_BUCKETS,
                                                initial={"preset": SPARSE_PRESETS}),
    "kvrelay_kv_transfer_seconds": Metric("histogram", ("prefill",), buckets=TRANSFER_BUCKETS),
    "kvrelay_kv_transfer_failures_total": Metric("counter", ("prefill", "decode"), ("reason",)),
    "kvrelay_kv_recomputes_total": Metric("counter", ("decode", "colocated")),
}
LABEL_VALUES = {"role": ROLES, "status": STATUSES, "reason": REASONS, "pool": POOLS, "preset": PRESET_LABELS}


def legal_values(series: str, label: str) -> tuple[str, ...] | None:
    _, m = series_names()[series]
    return m.values.get(label, LABEL_VALUES.get(label))


def series_names() -> dict[str, tuple[str, Metric]]:
    """Every series name a query may use -> (contract name, metric)."""
    names = {}
    for name, m in CONTRACT.items():
        suffixes = ("_bucket", "_count", "_sum") if m.kind == "histogram" else ("",)
        names.update({name + s: (name, m) for s in suffixes})
    return names


def labels_of(series: str) -> set[str]:
    _, m = series_names()[series]
    labels = set(m.labels) | ({"role", "worker"} if m.exported_by != (ROUTER,) else set())
    return labels | ({"le"} if series.endswith("_bucket") else set())


# -- the dashboards ----------------------------------------------------------------------

def dashboard_files() -> list[Path]:
    return sorted(GRAFANA.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(p.get("title", ""), t) for p in panels(dashboard) for t in p.get("targets", [])]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


DASHBOARDS = dashboard_files()
ids = [p.stem for p in DASHBOARDS]


def test_four_dashboards_with_unique_uids_and_titles():
    assert len(DASHBOARDS) == 4, DASHBOARDS
    dashboards = [load(p) for p in DASHBOARDS]
    for path, d in zip(DASHBOARDS, dashboards):
        assert d.get("title") and d.get("uid"), path
        assert path.stem == d["uid"], "file named after its uid"
        assert 8 <= len(d["uid"]) <= 40 and re.fullmatch(r"[a-z0-9-]+", d["uid"])
    assert len({d["uid"] for d in dashboards}) == len(dashboards)
    assert len({d["title"] for d in dashboards}) == len(dashboards)
    assert {d["uid"] for d in dashboards} == {"kvrelay-overview", "kvrelay-kv-routing", "kvrelay-transfer",
                                             "kvrelay-workers"}


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_valid_against_grafana_schema(path, validator):
    errors = sorted(validator.iter_errors(load(path)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:10])


def test_schema_rejects_unknown_fields(validator):
    """The schema is strict, so the validation above means something."""
    d = load(DASHBOARDS[0])
    d["panels"][0]["exprr"] = "typo"
    assert not validator.is_valid(d)


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_dashboard_settings(path):
    d = load(path)
    assert d["tags"] == ["kvrelay"]
    assert d["refresh"] == "10s"
    assert d["time"] == {"from": "now-30m", "to": "now"}
    ds = variables(d)["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_panels_and_layout(path):
    d = load(path)
    ps = panels(d)
    assert len({p["id"] for p in ps}) == len(ps), "panel ids unique"
    cells = set()
    for p in ps:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert p.get("title"), p
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == DATASOURCE, p["title"]
            assert p["targets"], p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_targets_use_the_datasource_variable_and_allowed_variables(path):
    d = load(path)
    defined = set(variables(d))
    for title, t in targets(d):
        assert t["datasource"] == DATASOURCE, title
        assert t.get("expr", "").strip() and t.get("refId"), title
        assert "legendFormat" in t, title
        used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
        assert used <= ALLOWED_EXPR_VARIABLES, f"{title}: {used - ALLOWED_EXPR_VARIABLES} in {t['expr']}"
        assert used - {"__rate_interval"} <= defined, f"{title}: undefined variable in {t['expr']}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_datasource_variable_only_in_datasource_fields(path):
    """$datasource appears only as {"uid": "${datasource}"} of a datasource reference;
    every other variable mentioned anywhere (legends, descriptions) is defined."""
    d = load(path)
    defined = set(variables(d)) | {"__rate_interval"}

    def walk(node, key=None, parent_key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k, key)
        elif isinstance(node, list):
            for v in node:
                walk(v, None, parent_key if key is None else key)
        elif isinstance(node, str):
            used = set(re.findall(r"\$\{?(\w+)", node))
            if "datasource" in used:
                assert (parent_key, key, node) == ("datasource", "uid", "${datasource}"), (parent_key, key, node)
            assert used <= defined, f"undefined {used - defined} in {node!r}"

    walk(d)


# -- queries against the contract --------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers that are not functions, keywords,
    label names (in `{}` or `by (...)`), durations or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", s)
    names = set()
    for m in re.finditer(r"([A-Za-z_:][\w:]*)(\s*\()?", s):
        if not m.group(2) and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(series, label, op, value) of every label matcher."""
    out = []
    for sel in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', sel.group(2)):
            out.append((sel.group(1), label, op, value))
    return out


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in clause.split(",") if x.strip()}
    return labels


def test_expression_parsers():
    expr = ('histogram_quantile(0.99, sum by (le, role) (rate(kvrelay_kv_transfer_seconds_bucket'
            '{role=~"prefill|decode"}[$__rate_interval]))) / clamp_min(sum(kvrelay_x_total), 1e-9) > bool 2')
    assert metric_names(expr) == {"kvrelay_kv_transfer_seconds_bucket", "kvrelay_x_total"}
    assert matchers(expr) == [("kvrelay_kv_transfer_seconds_bucket", "role", "=~", "prefill|decode")]
    assert grouping_labels(expr) == {"le", "role"}


ALL_TARGETS = [(path.stem, title, t["expr"]) for path in DASHBOARDS for title, t in targets(load(path))]


@pytest.mark.parametrize("dashboard,title,expr", ALL_TARGETS, ids=[f"{d}:{t}" for d, t, _ in ALL_TARGETS])
def test_queries_use_contract_metrics_labels_and_values(dashboard, title, expr):
    known = series_names()
    names = metric_names(expr)
    assert names, f"no metric in {expr}"
    assert names <= set(known), f"not in the metric contract: {names - set(known)}"
    available = set().union(*(labels_of(n) for n in names))
    assert grouping_labels(expr) <= available, f"grouping by a label no series has: {expr}"
    for series, label, op, value in matchers(expr):
        assert label in labels_of(series), f"{series} has no label {label}"
        if label == "le":
            slo = {"kvrelay_time_to_first_token_seconds_bucket": "$ttft_slo",
                   "kvrelay_inter_token_latency_seconds_bucket": "$itl_slo"}
            assert (op, value) == ("=", slo.get(series)), f"le matcher {value!r} on {series}"
        elif legal_values(series, label) is not None:
            values = value.split("|") if op in ("=~", "!~") else [value]
            assert set(values) <= set(legal_values(series, label)), f"{label} values {values} on {series}"


def test_every_panel_kind_of_the_brief_is_there():
    exprs = {d: " ".join(e for dd, _, e in ALL_TARGETS if dd == d) for d in {d for d, _, _ in ALL_TARGETS}}
    overview, kv, transfer, workers = (exprs[k] for k in ("kvrelay-overview", "kvrelay-kv-routing",
                                                           "kvrelay-transfer", "kvrelay-workers"))
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time"):
        assert f"kvrelay_{histogram}_seconds_bucket" in overview
    assert 'le="$ttft_slo"' in overview and 'le="$itl_slo"' in overview
    assert "sum by (status)" in overview and 'status!="ok"' in overview
    assert "kvrelay_prompt_tokens_total" in overview and "kvrelay_generation_tokens_total" in overview
    for m in ("kv_cache_usage_ratio", "running_requests", "waiting_requests", "router_predicted_hit_tokens_total",
              "prefix_cache_hit_tokens_total", "prefix_cache_query_tokens_total", "prefill_computed_tokens_total",
              "router_decisions_total", "router_index_blocks", "preemptions_total", "router_placement_cost_bucket"):
        assert f"kvrelay_{m}" in kv, m
    for m in ("kv_transfer_bytes_total", "kv_transfer_full_bytes_total", "kv_transfer_full_16bit_bytes_total",
              "kv_transfer_seconds_bucket", "kv_transfer_failures_total", "kv_recomputes_total",
              "kv_compression_fallbacks_total", "kv_compression_kept_ratio_bucket"):
        assert f"kvrelay_{m}" in transfer, m
    assert "sum by (reason)" in transfer and "clamp_min" in transfer
    transfer_exprs = [e for d, _, e in ALL_TARGETS if d == "kvrelay-transfer"]
    # Compression ratio per preset, against 16-bit KV and against the cache dtype.
    wire = "sum by (preset) (rate(kvrelay_kv_transfer_bytes_total[$__rate_interval]))"
    for full in ("kvrelay_kv_transfer_full_16bit_bytes_total", "kvrelay_kv_transfer_full_bytes_total"):
        assert f"sum by (preset) (rate({full}[$__rate_interval])) / {wire}" in transfer_exprs, full
    assert "sum by (reason) (rate(kvrelay_kv_compression_fallbacks_total[$__rate_interval]))" in transfer_exprs
    assert "sum by (le, preset) (rate(kvrelay_kv_compression_kept_ratio_bucket" in transfer
    for m in ("worker_up", "worker_restarts_total", "running_requests", "waiting_requests", "kv_cache_usage_ratio"):
        assert f"kvrelay_{m}" in workers, m


def test_slo_variables_are_bucket_bounds():
    """`le="$ttft_slo"` selects a bucket only if the value is spelled exactly as the
    exporter spells the bound (prometheus_client: 1 -> "1.0")."""
    overview = load(GRAFANA / "kvrelay-overview.json")
    for name, buckets, default in (("ttft_slo", TTFT_BUCKETS, "1.0"), ("itl_slo", ITL_BUCKETS, "0.1")):
        v = variables(overview)[name]
        bounds = {floatToGoString(b) for b in buckets}
        values = [o["value"] for o in v["options"]]
        assert values and set(values) <= bounds, f"{name}: {set(values) - bounds}"
        assert v["query"].split(",") == values
        assert v["current"]["value"] == v["current"]["text"] == default
        assert [o["value"] for o in v["options"] if o["selected"]] == [default]
    assert {"0.25", "0.5", "0.75", "1.0", "2.5", "5.0"} <= {o["value"] for o in variables(overview)["ttft_slo"]["options"]}


# -- the generator -----------------------------------------------------------------------

def test_helm_copies_are_identical():
    helm = sorted(HELM_DASHBOARDS.glob("*.json"))
    assert [p.name for p in helm] == [p.name for p in DASHBOARDS]
    for ours, theirs in zip(DASHBOARDS, helm):
        assert ours.read_bytes() == theirs.read_bytes(), theirs


def test_builder_check_passes():
    r = subprocess.run([sys.executable, str(BUILDER), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_builder_check_catches_stale_json(tmp_path):
    """On a copy: build, then --check passes; edit one JSON, or leave an old dashboard
    behind, and --check fails; a rebuild repairs both."""
    builder = tmp_path / "deploy" / "grafana" / "build_dashboards.py"
    builder.parent.mkdir(parents=True)
    shutil.copy(BUILDER, builder)

    def run(*args):
        return subprocess.run([sys.executable, str(builder), *args], capture_output=True, text=True, timeout=60)

    assert run().returncode == 0
    assert run("--check").returncode == 0
    copy = tmp_path / "helm" / "kvrelay" / "dashboards" / "kvrelay-overview.json"
    copy.write_text(copy.read_text().replace('"10s"', '"5s"'))
    (tmp_path / "deploy" / "grafana" / "kvrelay-old.json").write_text("{}")
    r = run("--check")
    assert r.returncode == 1 and "kvrelay-overview.json" in r.stderr and "kvrelay-old.json" in r.stderr
    assert run().returncode == 0 and run("--check").returncode == 0


# -- every query returns a series on a healthy cluster (offline, real promtool) -----------

PROMTOOL = shutil.which("promtool")
STEPS, EVAL_TIME = 20, "5m"  # 15 s samples over 5 minutes


def label_sets(m: Metric, workers: list[tuple[str, str]], pools: list[str]) -> list[dict]:
    """Every label combination the contract pre-initialises."""
    choices = {"status": STATUSES, "reason": REASONS, "pool": pools, "policy": ["kv_aware"],
               "worker": [w for _, w in workers], **m.values, **m.initial}
    if m.labels == ("role", "worker"):
        return [{"role": r, "worker": w} for r, w in workers]
    return [dict(zip(m.labels, combo)) for combo in itertools.product(*(choices[l] for l in m.labels))]


def healthy_cluster(mode: str) -> list[dict]:
    """promtool input series: a cluster that serves requests steadily, nothing failing."""
    roles = {"disaggregated": ("prefill", "decode"), "colocated": ("colocated",)}[mode]
    workers = [(role, f"{role}-{i}") for role in roles for i in range(2)]
    # Nothing failing, and every request under the default preset "none" (lossless): no
    # compression fallbacks, no sparse payloads (their histogram stays empty).
    quiet = {"kvrelay_kv_transfer_failures_total", "kvrelay_kv_recomputes_total", "kvrelay_preemptions_total",
             "kvrelay_router_index_evictions_total", "kvrelay_worker_restarts_total",
             "kvrelay_kv_compression_fallbacks_total", "kvrelay_kv_compression_kept_ratio",
             "kvrelay_admission_wait_seconds", "kvrelay_admission_rejections_total", "kvrelay_request_migrations_total",
             "kvrelay_request_retries_total"}
    gauges = {"kvrelay_worker_up": "1", "kvrelay_kv_cache_usage_ratio": "0.4", "kvrelay_running_requests": "2",
              "kvrelay_waiting_requests": "0", "kvrelay_router_index_blocks": "120", "kvrelay_admission_queue_depth": "0"}
    out = []

    def add(name, labels, values):
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.append({"series": f"{name}{{{selector}}}", "values": values})

    for name, m in CONTRACT.items():
        if m.exported_by == (ROUTER,):
            processes = [{"job": "kvrelay", "instance": "127.0.0.1:8000"}]
        else:
            processes = [{"job": "kvrelay", "instance": f"127.0.0.1:{41000 + i}", "role": role, "worker": w}
                         for i, (role, w) in enumerate(workers) if role in m.exported_by]
        for process, labels in itertools.product(processes, label_sets(m, workers, list(roles))):
            labels = {**process, **labels}
            if m.kind == "histogram":
                # 2 observations per 15 s, all in the middle bucket (none if quiet).
                middle, n = m.buckets[len(m.buckets) // 2], 0 if name in quiet else 2
                for b in (*m.buckets, float("inf")):
                    add(f"{name}_bucket", {**labels, "le": floatToGoString(b)},
                        f"0+{n if b >= middle else 0}x{STEPS}")
                add(f"{name}_count", labels, f"0+{n}x{STEPS}")
                add(f"{name}_sum", labels, f"0+{n * middle}x{STEPS}")
            elif m.kind == "gauge":
                add(name, labels, f"{gauges[name]}x{STEPS}")
            else:
                zero = name in quiet or labels.get("status", "ok") != "ok"
                add(name, labels, f"0+{0 if zero else 50}x{STEPS}")
    return out


def substitute(expr: str, dashboard: dict) -> str:
    """What Grafana sends: $__rate_interval (1m, as the live test uses) and the current
    value of every template variable."""
    expr = expr.replace("$__rate_interval", "1m")
    for name, v in variables(dashboard).items():
        if "current" in v:
            expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", v["current"]["value"], expr)
    return expr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (Debian package `prometheus`: make system-deps)")
@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_every_query_returns_a_series_on_a_healthy_cluster(mode, tmp_path):
    """Colocated clusters have no KV transfers, so the transfer dashboard is left out there."""
    checks = []
    for path in DASHBOARDS:
        d = load(path)
        if mode == "colocated" and d["uid"] == "kvrelay-transfer":
            continue
        for title, t in targets(d):
            expr = substitute(t["expr"], d)
            # count() of anything, NaN included, is >= 1; of nothing, empty (and the test fails).
            checks.append({"expr": f"count({expr}) > bool 0", "eval_time": EVAL_TIME,
                           "exp_samples": [{"labels": "{}", "value": 1}]})
    unit = {"rule_files": [], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": healthy_cluster(mode), "promql_expr_test": checks}]}
    path = tmp_path / "dashboards.test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False, width=1000))
    r = subprocess.run([PROMTOOL, "test", "rules", str(path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
