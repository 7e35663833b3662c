"""A real Prometheus server (Debian's ``prometheus``) scraping a local kvrelay with the
scrape config and alert rules in deploy/prometheus/, for the live test and the
dashboard benchmark. Only the address of kvrelay and the intervals are changed."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.server import free_port, log

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"


class PrometheusServer:
    def __init__(self, kvrelay_url: str, scrape_interval_s: float = 1.0, evaluation_interval_s: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("the prometheus binary is not on PATH (make system-deps installs Debian's)")
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="kvrelay-prometheus-"))
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(
            local_config(kvrelay_url, scrape_interval_s, evaluation_interval_s), sort_keys=False))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        cmd = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    log(f"prometheus ready at {self.url}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PrometheusServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP API -----------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        body = r.json()
        if r.status_code != 200 and "status" not in body:
            r.raise_for_status()
        return body

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The whole API answer (``status``, ``data.result`` or ``error``)."""
        return self._get("/api/v1/query", {"query": expr, **({"time": at} if at is not None else {})})

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> dict[str, Any]:
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step_s})

    def active_targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets")["data"]["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self._get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]

    def wait_for_targets(self, n: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Until ``n`` targets are discovered and every one has been scraped healthily."""
        deadline = time.monotonic() + timeout_s
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = self.active_targets()
            if len(targets) >= n and all(t["health"] == "up" for t in targets):
                return targets
            time.sleep(0.5)
        raise TimeoutError(f"prometheus did not scrape {n} healthy targets in {timeout_s:.0f}s: "
                           f"{[(t['scrapeUrl'], t['health'], t.get('lastError')) for t in targets]}")


def local_config(kvrelay_url: str, scrape_interval_s: float, evaluation_interval_s: float) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with kvrelay's address, the intervals and the
    rule files' absolute paths changed; everything else as shipped."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config.setdefault("global", {})
    config["global"]["scrape_interval"] = f"{scrape_interval_s:g}s"
    config["global"]["evaluation_interval"] = f"{evaluation_interval_s:g}s"
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config.get("rule_files", [])]
    host = kvrelay_url.split("://", 1)[-1].rstrip("/")
    for job in config["scrape_configs"]:
        job["scrape_interval"] = f"{scrape_interval_s:g}s"
        for sd in job.get("http_sd_configs", []):
            sd["url"] = re.sub(r"^(https?://)[^/]+", lambda m: m.group(1) + host, sd["url"])
            sd["refresh_interval"] = f"{scrape_interval_s:g}s"
    return config


# ---- dashboards and alerts as queries ------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def dashboard_queries(rate_interval: str = "1m") -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr with template variables substituted) for every
    target of every panel of every dashboard in deploy/grafana/."""
    import json

    out = []
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        values = {"__rate_interval": rate_interval, "__interval": "15s", "__range": "30m", **template_values(board)}
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((board.get("uid", path.stem), panel.get("title", ""), substitute(target["expr"], values)))
    return out


def template_values(board: dict[str, Any]) -> dict[str, str]:
    """Each template variable's current value (what Grafana substitutes by default)."""
    values = {}
    for var in board.get("templating", {}).get("list", []):
        current = var.get("current") or {}
        value = current.get("value", var.get("query"))
        values[var["name"]] = str(value[0] if isinstance(value, list) else value)
    return values


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out += _panels(p.get("panels", []))  # collapsed rows hold their panels
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


def alert_rules() -> list[dict[str, Any]]:
    out = []
    for path in sorted(PROMETHEUS_DIR.glob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []):
            out += [r for r in group.get("rules", []) if "alert" in r]
    return out


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def as_bool_comparison(expr: str) -> str:
    """``q > 0.9`` -> ``q > bool 0.9``: the top-level comparison returns 0/1 for every
    series instead of filtering, so a healthy cluster still answers with data. Raises
    ValueError unless there is exactly one comparison outside brackets and strings."""
    depth, i, found = 0, 0, []
    quote = None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is not None and not expr.startswith("=~", i) and not expr.startswith("!~", i):
                found.append((i, op))
                i += len(op)
                continue
        i += 1
    if len(found) != 1:
        raise ValueError(f"want exactly one top-level comparison in {expr!r}, found {len(found)}")
    pos, op = found[0]
    rest = expr[pos + len(op):]
    if rest.lstrip().startswith("bool"):
        return expr
    return f"{expr[:pos]}{op} bool{rest}"
