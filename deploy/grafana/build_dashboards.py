"""Build kvrelay's Grafana dashboards (JSON) from the metric contract.

    python deploy/grafana/build_dashboards.py          # rewrite the JSON
    python deploy/grafana/build_dashboards.py --check  # exit 1 if the JSON is stale

Writes one file per dashboard, named after its uid, into deploy/grafana/ and an
identical copy into helm/kvrelay/dashboards/ (the chart ships them as ConfigMaps).
Edit this file, never the JSON.

Every query uses the `datasource` variable and, besides it, only `$__rate_interval`,
`$ttft_slo` and `$itl_slo`. Every query returns a series on a healthy cluster that has
served a few requests: labelled counters are exported at 0 from the start, so nothing
filters on a series that only appears after a failure (the byte counters under preset
"none", fallbacks under every reason, the kept-ratio histogram under every sparse preset).

Ratios of two rates (hit rates, SLO attainment) are left NaN when there is no traffic,
which Grafana draws as a gap rather than a misleading 0; ratios whose idle value is
meaningful (error ratio, failure ratio, bytes saved) clamp their denominator instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIRS = (ROOT / "deploy" / "grafana", ROOT / "helm" / "kvrelay" / "dashboards")

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"

# Histogram buckets, for the SLO pickers: from the code that exports them.
sys.path.insert(0, str(ROOT))
from router.metrics import ITL_BUCKETS, TTFT_BUCKETS  # noqa: E402


def le(bound: float) -> str:
    """A bucket bound as its `le` label value: prometheus_client writes 1 as "1.0" (and
    Prometheus 3 normalises every `le` that way on ingestion), 0.25 as "0.25"."""
    return repr(float(bound))


# -- PromQL ------------------------------------------------------------------------------

def rate(metric: str, selector: str = "") -> str:
    return f"rate({metric}{selector}{RATE})"


def quantile(q: float, histogram: str, by: str = "", selector: str = "") -> str:
    """The q-quantile of a histogram over all processes (or per `by` label)."""
    labels = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', selector)}))"


def quantiles(histogram: str, qs=(0.5, 0.9, 0.99), by: str = "") -> list[tuple[str, str]]:
    suffix = f" {{{{{by}}}}}" if by else ""
    return [(quantile(q, histogram, by), f"p{round(q * 100)}{suffix}") for q in qs]


# Roles whose prefix cache saves prefill compute (decode workers' hits save transfer bytes).
PREFILL_ROLES = '{role=~"prefill|colocated"}'
NOT_OK = '{status!="ok"}'
WITHIN_TTFT_SLO = '{le="$ttft_slo"}'  # the bucket whose bound is the SLO
WITHIN_ITL_SLO = '{le="$itl_slo"}'

REQUESTS = f"sum({rate('kvrelay_requests_total')})"
ERROR_RATIO = f"sum({rate('kvrelay_requests_total', NOT_OK)}) / clamp_min({REQUESTS}, 1e-9)"
GOODPUT = f"sum({rate('kvrelay_time_to_first_token_seconds_bucket', WITHIN_TTFT_SLO)})"
TTFT_ATTAINMENT = f"{GOODPUT} / sum({rate('kvrelay_time_to_first_token_seconds_count')})"
ITL_ATTAINMENT = (
    f"sum({rate('kvrelay_inter_token_latency_seconds_bucket', WITHIN_ITL_SLO)})"
    f" / sum({rate('kvrelay_inter_token_latency_seconds_count')})"
)
PREDICTED_HIT = f"sum({rate('kvrelay_router_predicted_hit_tokens_total')}) / sum({rate('kvrelay_prompt_tokens_total')})"
REALIZED_HIT = (
    f"sum({rate('kvrelay_prefix_cache_hit_tokens_total', PREFILL_ROLES)})"
    f" / sum({rate('kvrelay_prefix_cache_query_tokens_total', PREFILL_ROLES)})"
)
HIT_RATE_PER_WORKER = (
    f"sum by (worker) ({rate('kvrelay_prefix_cache_hit_tokens_total')})"
    f" / sum by (worker) ({rate('kvrelay_prefix_cache_query_tokens_total')})"
)
# The byte counters carry a `preset` label (the compression preset of each handoff);
# these sums add every preset up.
WIRE_BYTES = f"sum({rate('kvrelay_kv_transfer_bytes_total')})"
FULL_BYTES = f"sum({rate('kvrelay_kv_transfer_full_bytes_total')})"  # in the KV cache's dtype
FULL_16BIT_BYTES = f"sum({rate('kvrelay_kv_transfer_full_16bit_bytes_total')})"  # the same KV in 16 bits
# At least one byte per second in the denominator: an idle link reads 0, not NaN.
COMPRESSION = f"{FULL_BYTES} / clamp_min({WIRE_BYTES}, 1)"
BYTES_SAVED = f"({FULL_BYTES} - {WIRE_BYTES}) / clamp_min({FULL_BYTES}, 1)"
# Per preset: the ratio compression is quoted as (against the same prompts' KV in 16 bits),
# and against the cache dtype. Left NaN (a gap) for a preset with no traffic in the window.
WIRE_BY_PRESET = f"sum by (preset) ({rate('kvrelay_kv_transfer_bytes_total')})"
RATIO_16BIT_BY_PRESET = f"sum by (preset) ({rate('kvrelay_kv_transfer_full_16bit_bytes_total')}) / {WIRE_BY_PRESET}"
RATIO_CACHE_BY_PRESET = f"sum by (preset) ({rate('kvrelay_kv_transfer_full_bytes_total')}) / {WIRE_BY_PRESET}"
FALLBACKS_BY_REASON = f"sum by (reason) ({rate('kvrelay_kv_compression_fallbacks_total')})"
TRANSFERS = f"sum({rate('kvrelay_kv_transfer_seconds_count')})"
FAILURES = f"sum({rate('kvrelay_kv_transfer_failures_total')})"
# As in the KVRelayTransferFailures alert: failures / (successful transfers + failures).
FAILURE_RATIO = f"{FAILURES} / clamp_min({TRANSFERS} + {FAILURES}, 1e-9)"
WORKER_UP = "max by (role, worker) (kvrelay_worker_up)"  # up if any router replica reaches it


# -- panels ------------------------------------------------------------------------------

def thresholds(*steps: tuple[float, str], base: str = "green") -> dict:
    return {"mode": "absolute", "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for v, c in steps]}


# NaN (a ratio or quantile with no traffic) reads "no traffic" in stats and bar gauges.
NO_TRAFFIC = [{"type": "special", "options": {"match": "nan", "result": {"text": "no traffic"}}}]
UP_DOWN = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}]

STAT_OPTIONS = {
    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "orientation": "auto", "textMode": "auto",
}
OPTIONS = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "stat": STAT_OPTIONS,
    "bargauge": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
    },
    "state-timeline": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
        "mergeValues": True, "rowHeight": 0.8, "showValue": "never",
        "tooltip": {"mode": "single", "sort": "none"},
    },
    "table": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
}


def panel(kind: str, title: str, description: str, queries: list[tuple[str, str]], *, w: int, h: int = 8,
          unit: str = "short", min: float | None = None, max: float | None = None, steps=(), base: str = "green",
          mappings=None, stacked: bool = False, table: bool = False, transformations=None,
          overrides=()) -> dict:
    """One panel; `queries` are (PromQL, legend) pairs. Placed later by `layout`."""
    defaults: dict = {"unit": unit, "color": {"mode": "palette-classic"}}
    defaults["thresholds"] = thresholds(*steps, base=base)
    if min is not None:
        defaults["min"] = min
    if max is not None:
        defaults["max"] = max
    if mappings is not None:
        defaults["mappings"] = mappings
    elif kind in ("stat", "bargauge"):
        defaults["mappings"] = NO_TRAFFIC
    if kind in ("stat", "bargauge", "state-timeline"):
        defaults["color"] = {"mode": "thresholds"}
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 25 if stacked else 10,
                              "showPoints": "never", "spanNulls": False,
                              "stacking": {"mode": "normal" if stacked else "none", "group": "A"}}
    targets = []
    for i, (expr, legend) in enumerate(queries):
        target = {"datasource": DATASOURCE, "refId": chr(ord("A") + i), "editorMode": "code",
                  "expr": expr, "legendFormat": legend}
        target.update({"format": "table", "instant": True, "range": False} if table else {"range": True})
        targets.append(target)
    p = {"type": kind, "title": title, "description": description, "datasource": DATASOURCE,
         "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
         "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
         "options": OPTIONS[kind], "targets": targets}
    if transformations:
        p["transformations"] = transformations
    return p


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}}


def layout(panels: list[dict]) -> list[dict]:
    """Left to right, wrapping at Grafana's 24 columns; a row starts a new line. Ids in order."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        pos = p["gridPos"]
        if p["type"] == "row" or x + pos["w"] > 24:
            x, y, line_h = 0, y + line_h, 0
        pos["x"], pos["y"] = x, y
        p["id"] = i
        x, line_h = x + pos["w"], max(line_h, pos["h"])
        if p["type"] == "row":
            x, y, line_h = 0, y + pos["h"], 0
    return panels


# -- template variables ------------------------------------------------------------------

DATASOURCE_VAR = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                  "hide": 0, "refresh": 1, "regex": "", "includeAll": False, "multi": False, "skipUrlSync": False}


def slo_var(name: str, label: str, bounds, default: float, description: str) -> dict:
    """A picker over histogram bucket bounds: `le="$name"` then selects one bucket."""
    values = [le(b) for b in bounds]
    assert le(default) in values
    return {
        "name": name, "label": label, "description": description, "type": "custom",
        "query": ",".join(values),
        "current": {"selected": True, "text": le(default), "value": le(default)},
        "options": [{"selected": v == le(default), "text": v, "value": v} for v in values],
        "hide": 0, "includeAll": False, "multi": False, "skipUrlSync": False,
    }


TTFT_SLO = slo_var("ttft_slo", "TTFT SLO (s)", [b for b in TTFT_BUCKETS if 0.25 <= b <= 5], 1,
                   "Time-to-first-token target; the choices are the TTFT histogram's bucket bounds.")
ITL_SLO = slo_var("itl_slo", "ITL SLO (s)", [b for b in ITL_BUCKETS if 0.025 <= b <= 0.5], 0.1,
                  "Inter-token latency target; the choices are the ITL histogram's bucket bounds.")


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables=()) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["kvrelay"],
        "id": None, "editable": True, "graphTooltip": 1, "liveNow": False,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "timezone": "browser",
        "schemaVersion": 39, "fiscalYearStartMonth": 0, "weekStart": "",
        "links": [{"title": "kvrelay", "type": "dashboards", "tags": ["kvrelay"], "asDropdown": True,
                   "icon": "external link", "includeVars": True, "keepTime": True, "targetBlank": False,
                   "tooltip": "Other kvrelay dashboards"}],
        "templating": {"list": [DATASOURCE_VAR, *variables]},
        "panels": layout(panels),
    }


# -- the four dashboards -----------------------------------------------------------------

def overview() -> dict:
    ttft_p99 = quantile(0.99, "kvrelay_time_to_first_token_seconds")
    itl_p99 = quantile(0.99, "kvrelay_inter_token_latency_seconds")
    panels = [
        panel("stat", "Requests / s", "Finished requests per second, every status.", [(REQUESTS, "requests/s")],
              w=4, h=4, unit="reqps"),
        panel("stat", "Error ratio", "Share of requests that did not finish with status ok.",
              [(ERROR_RATIO, "errors")], w=4, h=4, unit="percentunit", steps=[(0.01, "orange"), (0.05, "red")]),
        panel("stat", "TTFT p99", "99th percentile of time to first token.", [(ttft_p99, "p99")],
              w=4, h=4, unit="s", steps=[(2, "red")]),
        panel("stat", "ITL p99", "99th percentile of the gap between two streamed tokens.", [(itl_p99, "p99")],
              w=4, h=4, unit="s", steps=[(0.1, "orange"), (0.5, "red")]),
        panel("stat", "Goodput", "Requests per second whose first token came within the TTFT SLO ($ttft_slo s).",
              [(GOODPUT, "goodput")], w=4, h=4, unit="reqps"),
        panel("stat", "TTFT SLO attainment", "Share of requests whose first token came within $ttft_slo s.",
              [(TTFT_ATTAINMENT, "attainment")], w=4, h=4, unit="percentunit", min=0, max=1,
              base="red", steps=[(0.9, "orange"), (0.99, "green")]),
        row("Requests"),
        panel("timeseries", "Request rate by status", "Finished requests per second by final status.",
              [(f"sum by (status) ({rate('kvrelay_requests_total')})", "{{status}}")], w=12, unit="reqps", min=0),
        panel("timeseries", "Errors by status", "Requests per second that finished with a status other than ok "
              "(client errors, rate limiting, timeouts, dead workers, cancellations).",
              [(f"sum by (status) ({rate('kvrelay_requests_total', NOT_OK)})", "{{status}}")],
              w=12, unit="reqps", min=0),
        row("Latency"),
        panel("timeseries", "Time to first token", "p50 / p90 / p99 from the router's TTFT histogram.",
              quantiles("kvrelay_time_to_first_token_seconds"), w=8, unit="s", min=0),
        panel("timeseries", "Inter-token latency", "p50 / p90 / p99 of the gap between two streamed tokens.",
              quantiles("kvrelay_inter_token_latency_seconds"), w=8, unit="s", min=0),
        panel("timeseries", "End-to-end latency", "p50 / p90 / p99 from request arrival to the last token.",
              quantiles("kvrelay_e2e_request_latency_seconds"), w=8, unit="s", min=0),
        panel("timeseries", "Queue time by role", "p50 / p99 of the time a request waits in a worker's engine "
              "before it is first scheduled, per pool.",
              quantiles("kvrelay_request_queue_time_seconds", (0.5, 0.99), by="role"), w=8, unit="s", min=0),
        panel("timeseries", "Goodput (TTFT SLO)", "Requests per second that got a first token, and those that got "
              "it within the TTFT SLO ($ttft_slo s).",
              [(f"sum({rate('kvrelay_time_to_first_token_seconds_count')})", "first token"),
               (GOODPUT, "within TTFT SLO")], w=8, unit="reqps", min=0),
        panel("timeseries", "SLO attainment", "Share of requests within the TTFT SLO ($ttft_slo s) and share of "
              "streamed tokens within the ITL SLO ($itl_slo s).",
              [(TTFT_ATTAINMENT, "requests within TTFT SLO"), (ITL_ATTAINMENT, "tokens within ITL SLO")],
              w=8, unit="percentunit", min=0, max=1),
        row("Admission and failures"),
        panel("timeseries", "Admission queue depth", "Requests waiting for KV room on a decode worker (FIFO, retries "
              "and migrations first); they are answered 503 only when the queue is full or the wait passes "
              "admission.queue_timeout_s.",
              [("sum by (pool) (kvrelay_admission_queue_depth)", "{{pool}}")], w=8, unit="short", min=0),
        panel("timeseries", "Admission wait", "p50 / p99 of the time requests that queued waited for KV room.",
              quantiles("kvrelay_admission_wait_seconds", (0.5, 0.99), by="pool"), w=8, unit="s", min=0),
        panel("timeseries", "Refused, migrated, retried", "Requests per second refused by admission (by reason), "
              "continued on another worker after their decode worker failed mid-stream (migrated), or retried "
              "elsewhere before their first token.",
              [(f"sum by (reason) ({rate('kvrelay_admission_rejections_total')})", "refused: {{reason}}"),
               (f"sum({rate('kvrelay_request_migrations_total')})", "migrated"),
               (f"sum({rate('kvrelay_request_retries_total')})", "retried")], w=8, unit="reqps", min=0),
        row("Tokens"),
        panel("timeseries", "Token throughput (tokens/s)", "Prompt and generated tokens per second of finished requests "
              "(as reported in `usage`).",
              [(f"sum({rate('kvrelay_prompt_tokens_total')})", "prompt"),
               (f"sum({rate('kvrelay_generation_tokens_total')})", "generation")], w=24, unit="short", min=0),
    ]
    return dashboard("kvrelay-overview", "kvrelay / Overview",
                     "Requests, latency, SLO goodput and token throughput as the router sees them.",
                     panels, variables=[TTFT_SLO, ITL_SLO])


# kvrelay_router_placement_cost parts in tokens of prefill work; the local-prefill flag; MiB shipped
COST_TOKEN_PARTS = 'part=~"prefill_uncached_tokens|prefill_queued_tokens|prefill_cost|decode_cost|local_cost"'
LOCAL = '{part="local_prefill"}'
SHIP = '{part="decode_ship_mib"}'


def kv_routing() -> dict:
    kv_usage = "max by (worker) (kvrelay_kv_cache_usage_ratio)"
    panels = [
        row("KV cache"),
        panel("timeseries", "KV cache usage per worker", "Share of each worker's KV cache blocks in use.",
              [(kv_usage, "{{worker}}")], w=12, unit="percentunit", min=0, max=1),
        panel("bargauge", "KV cache usage now", "Share of each worker's KV cache blocks in use.",
              [(kv_usage, "{{worker}}")], w=12, unit="percentunit", min=0, max=1,
              steps=[(0.8, "orange"), (0.95, "red")]),
        panel("timeseries", "Running and waiting requests", "Requests in each worker's running batch and queue.",
              [("sum by (worker) (kvrelay_running_requests)", "{{worker}} running"),
               ("sum by (worker) (kvrelay_waiting_requests)", "{{worker}} waiting")], w=12, min=0),
        panel("timeseries", "Preemptions", "Requests preempted per second for lack of KV blocks (recomputed later).",
              [(f"sum by (worker) ({rate('kvrelay_preemptions_total')})", "{{worker}}")], w=12, unit="reqps", min=0),
        row("Prefix cache"),
        panel("timeseries", "Prefix hit rate: predicted vs realized",
              "Predicted: prompt tokens the router expected the chosen prefill worker to hold, over all prompt "
              "tokens. Realized: prompt tokens the prefill (or colocated) workers served from their prefix cache, "
              "over the tokens they looked up. A gap between the two means the router's residency index is off.",
              [(PREDICTED_HIT, "predicted (router)"), (REALIZED_HIT, "realized (engines)")],
              w=12, unit="percentunit", min=0, max=1),
        panel("timeseries", "Realized hit rate per worker", "Prefix-cache hit tokens over looked-up tokens, per "
              "worker. On decode workers a hit is a page that did not have to be transferred.",
              [(HIT_RATE_PER_WORKER, "{{worker}}")],
              w=12, unit="percentunit", min=0, max=1),
        panel("timeseries", "Prefill tokens/s: computed vs saved", "Prompt tokens per second run through the model "
              "(per pool; on decode workers: recomputed prompts) and prompt tokens the prefill workers served "
              "from their prefix cache instead.",
              [(f"sum by (role) ({rate('kvrelay_prefill_computed_tokens_total')})", "computed ({{role}})"),
               (f"sum({rate('kvrelay_prefix_cache_hit_tokens_total', PREFILL_ROLES)})", "saved (prefix cache hit)")],
              w=24, min=0, stacked=True),
        row("Router"),
        panel("timeseries", "Placement decisions per worker", "Requests per second placed on each worker "
              "(the chosen prefill worker, or the decode / colocated worker), by policy.",
              [(f"sum by (policy, worker) ({rate('kvrelay_router_decisions_total')})", "{{worker}} ({{policy}})")],
              w=12, unit="reqps", min=0),
        panel("timeseries", "Placement cost of the chosen workers (kv_aware)",
              "kv_aware's cost of the placements it made, part by part, in tokens of prefill work "
              "(router/placement.py): prefill_uncached_tokens = prompt tokens the chosen worker must compute, "
              "prefill_queued_tokens = uncached tokens already queued there, prefill_cost / decode_cost = the two "
              "sides of a (prefill, decode) pair, local_cost = a decode worker prefilling a short rest itself. "
              "Uncached tokens rising at steady traffic mean prefixes are lost (evictions, or placement by load).",
              [(quantile(q, "kvrelay_router_placement_cost", "part", "{" + COST_TOKEN_PARTS + "}"), f"p{p} {{{{part}}}}")
               for q, p in ((0.5, 50), (0.9, 90))], w=12, min=0),
        panel("timeseries", "Local prefills and bytes shipped (kv_aware)",
              "Share of placements where the decode worker prefilled the rest of the prompt itself (it held more "
              "of it than any prefill worker; nothing shipped), and the MiB each placement had the prefill worker "
              "ship to the decode worker (p50 / p90).",
              [(f"sum({rate('kvrelay_router_placement_cost_sum', LOCAL)}) / "
                f"sum({rate('kvrelay_router_placement_cost_count', LOCAL)})", "local prefill share"),
               (quantile(0.5, "kvrelay_router_placement_cost", selector=SHIP), "MiB shipped p50"),
               (quantile(0.9, "kvrelay_router_placement_cost", selector=SHIP), "MiB shipped p90")], w=12, min=0),
        panel("timeseries", "Residency index size", "Blocks the router's residency index tracks, per pool.",
              [("sum by (pool) (kvrelay_router_index_blocks)", "{{pool}}")], w=6, min=0),
        panel("timeseries", "Residency index evictions", "Entries per second the index dropped to stay under "
              "its cap, per pool.",
              [(f"sum by (pool) ({rate('kvrelay_router_index_evictions_total')})", "{{pool}}")], w=6, unit="ops", min=0),
    ]
    return dashboard("kvrelay-kv-routing", "kvrelay / KV cache & routing",
                     "KV memory per worker, prefix reuse as the router predicted it and as the engines realized "
                     "it, and where the router places requests.", panels)


def transfer() -> dict:
    p99 = quantile(0.99, "kvrelay_kv_transfer_seconds")
    panels = [
        panel("stat", "On the wire", "KV payload bytes per second the prefill workers put on the wire.",
              [(WIRE_BYTES, "wire")], w=4, h=4, unit="Bps"),
        panel("stat", "Compression ratio", "Full-prompt KV bytes (in the cache dtype) over bytes on the wire "
              "(dedup, sparse, quantization together), every preset. 0 while idle.", [(COMPRESSION, "ratio")],
              w=4, h=4, unit="suffix:×"),
        panel("stat", "Bytes saved", "Share of the full-prompt KV bytes that did not travel.",
              [(BYTES_SAVED, "saved")], w=4, h=4, unit="percentunit", min=0, max=1),
        panel("stat", "Transfer p99", "99th percentile of first page sent to decode worker's ack.",
              [(p99, "p99")], w=4, h=4, unit="s", steps=[(1, "orange"), (5, "red")]),
        panel("stat", "Failure ratio", "Failed transfers over all transfers (as in the KVRelayTransferFailures "
              "alert; both sides count a failure they see).", [(FAILURE_RATIO, "failures")],
              w=4, h=4, unit="percentunit", steps=[(0.01, "orange"), (0.05, "red")]),
        panel("stat", "Recomputes / s", "Handed-off requests whose KV never arrived and that the decode worker "
              "recomputed.", [(f"sum({rate('kvrelay_kv_recomputes_total')})", "recomputes")],
              w=4, h=4, unit="reqps", steps=[(0.01, "orange")]),
        row("Bytes"),
        panel("timeseries", "KV bytes: on the wire vs full", "What crossed the wire, and what shipping every "
              "prompt page uncompressed would have cost: in the KV cache's dtype, and in 16 bits (what "
              "compression ratios are quoted against).",
              [(WIRE_BYTES, "on the wire"), (FULL_BYTES, "full KV (uncompressed)"),
               (FULL_16BIT_BYTES, "full KV (16-bit)")], w=12, unit="Bps", min=0),
        panel("timeseries", "Compression ratio", "Full-prompt KV bytes (cache dtype) over bytes on the wire, "
              "every preset.", [(COMPRESSION, "full / wire")], w=12, unit="suffix:×", min=0),
        panel("timeseries", "Bytes on the wire per prefill worker", "KV payload bytes per second each prefill "
              "worker sends.", [(f"sum by (worker) ({rate('kvrelay_kv_transfer_bytes_total')})", "{{worker}}")],
              w=12, unit="Bps", min=0),
        panel("timeseries", "Transfer latency", "First page sent to the decode worker's ack, successful transfers.",
              quantiles("kvrelay_kv_transfer_seconds", (0.5, 0.99)), w=12, unit="s", min=0),
        row("Compression"),
        panel("timeseries", "Compression ratio per preset (vs 16-bit KV)", "Per compression preset: the "
              "prompts' KV in 16 bits over the bytes that crossed the wire (dedup, sparse selection and "
              "quantization together), the ratio compression is quoted as. A preset labelled <name>* is the "
              "deployment's default with overrides. A gap: no traffic under that preset.",
              [(RATIO_16BIT_BY_PRESET, "{{preset}}")], w=12, unit="suffix:×", min=0),
        panel("timeseries", "Compression ratio per preset (vs cache dtype)", "Per compression preset: the "
              "prompts' KV in the KV cache's own dtype over the bytes that crossed the wire, what the "
              "deployment saves on its link. A gap: no traffic under that preset.",
              [(RATIO_CACHE_BY_PRESET, "{{preset}}")], w=12, unit="suffix:×", min=0),
        panel("timeseries", "Compression fallbacks by reason", "Compressed handoffs per second that lost (part "
              "of) their compression: guard (the quality guard raised a layer's budget, prefill side), "
              "capacity (no room for that on the decode worker), preempted, codec (a malformed payload; the "
              "request is recomputed at full size).", [(FALLBACKS_BY_REASON, "{{reason}}")],
              w=12, unit="ops", min=0),
        panel("timeseries", "Kept ratio per preset (sparse)", "Per request, the fraction of the shipped "
              "suffix's tokens a sparse payload kept (mean over layers): p10 / p50 / p90 per sparse preset. "
              "No data (NaN) until a sparse payload ships under that preset.",
              quantiles("kvrelay_kv_compression_kept_ratio", (0.1, 0.5, 0.9), by="preset"),
              w=12, unit="percentunit", min=0, max=1),
        row("Failures"),
        panel("timeseries", "Transfers and failures", "Successful transfers per second, and failures per second "
              "by reason (counted by whichever side saw it).",
              [(TRANSFERS, "succeeded"),
               (f"sum by (reason) ({rate('kvrelay_kv_transfer_failures_total')})", "failed: {{reason}}")],
              w=12, unit="ops", min=0),
        panel("timeseries", "Recomputes per worker", "Handed-off requests per second whose KV never arrived, "
              "recomputed by the decode worker.",
              [(f"sum by (worker) ({rate('kvrelay_kv_recomputes_total')})", "{{worker}}")], w=12, unit="reqps", min=0),
    ]
    return dashboard("kvrelay-transfer", "kvrelay / KV transfer",
                     "KV pages from prefill to decode workers: bytes, compression, latency and failures.", panels)


def workers() -> dict:
    table_transforms = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {
            "excludeByName": {"Time": True},
            "indexByName": {"worker": 0, "role": 1},
            "renameByName": {"Value #A": "up", "Value #B": "restarts", "Value #C": "running",
                             "Value #D": "waiting", "Value #E": "KV usage"},
        }},
    ]
    panels = [
        panel("stat", "Workers up", "Workers the router's health probes reach.",
              [(f"sum({WORKER_UP})", "up")], w=6, h=4, mappings=[]),
        panel("stat", "Workers down", "Workers the router's health probes cannot reach.",
              [(f"count({WORKER_UP}) - sum({WORKER_UP})", "down")], w=6, h=4, mappings=[], steps=[(1, "red")]),
        panel("stat", "Restarts", "Worker restarts the router has seen since it started.",
              [("sum(max by (role, worker) (kvrelay_worker_restarts_total))", "restarts")], w=6, h=4, mappings=[], steps=[(1, "orange")]),
        panel("stat", "KV cache usage (max)", "Fullest worker's share of KV cache blocks in use.",
              [("max(kvrelay_kv_cache_usage_ratio)", "max")], w=6, h=4, unit="percentunit", min=0, max=1,
              mappings=[], steps=[(0.8, "orange"), (0.95, "red")]),
        panel("stat", "Worker status", "The router's health probe of each worker, now.",
              [(WORKER_UP, "{{worker}}")], w=24, h=4, mappings=UP_DOWN),
        panel("state-timeline", "Worker up over time", "The router's health probe of each worker.",
              [(WORKER_UP, "{{worker}}")], w=24, h=6, mappings=UP_DOWN),
        panel("table", "Workers", "Every worker now: health, restarts, batch, queue and KV usage.",
              [(WORKER_UP, ""), ("max by (role, worker) (kvrelay_worker_restarts_total)", ""),
               ("max by (role, worker) (kvrelay_running_requests)", ""),
               ("max by (role, worker) (kvrelay_waiting_requests)", ""),
               ("max by (role, worker) (kvrelay_kv_cache_usage_ratio)", "")],
              w=24, h=8, mappings=[], table=True, transformations=table_transforms,
              overrides=[{"matcher": {"id": "byName", "options": "KV usage"},
                          "properties": [{"id": "unit", "value": "percentunit"}]}]),
        panel("bargauge", "Restarts per worker", "Restarts the router has seen, per worker, since it started.",
              [("max by (worker) (kvrelay_worker_restarts_total)", "{{worker}}")], w=8, mappings=[],
              min=0, steps=[(1, "orange")]),
        panel("timeseries", "Running and waiting requests", "Requests in each worker's running batch and queue.",
              [("sum by (worker) (kvrelay_running_requests)", "{{worker}} running"),
               ("sum by (worker) (kvrelay_waiting_requests)", "{{worker}} waiting")], w=8, min=0),
        panel("timeseries", "KV cache usage per worker", "Share of each worker's KV cache blocks in use.",
              [("max by (worker) (kvrelay_kv_cache_usage_ratio)", "{{worker}}")], w=8, unit="percentunit",
              min=0, max=1),
    ]
    return dashboard("kvrelay-workers", "kvrelay / Worker health",
                     "Every prefill, decode or colocated worker: health probes, restarts, load and KV memory.",
                     panels)


DASHBOARDS = (overview, kv_routing, transfer, workers)


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    out = {}
    for build in DASHBOARDS:
        d = build()
        out[f"{d['uid']}.json"] = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed JSON file differs")
    args = parser.parse_args(argv)
    files = render()
    stale = []
    for directory in OUTPUT_DIRS:
        # Dashboards this script no longer builds are stale too (and removed on a rewrite).
        for path in sorted(directory.glob("kvrelay-*.json")):
            if path.name in files:
                continue
            if args.check:
                stale.append(path)
            else:
                path.unlink()
        for name, text in files.items():
            path = directory / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(path)
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        print("run: python deploy/grafana/build_dashboards.py", file=sys.stderr)
        return 1
    if not args.check:
        print(f"wrote {len(files)} dashboards to " + ", ".join(str(d.relative_to(ROOT)) for d in OUTPUT_DIRS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
