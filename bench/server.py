"""``kvrelay serve`` as a subprocess on a free port (own process group, output to a
log file), for the benchmarks and the live tests."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``kvrelay serve`` in a subprocess (own process group), output to a log file."""

    def __init__(self, name: str, args: list[str], startup_timeout_s: float = 420.0, port: int | None = None) -> None:
        """``args``: everything after ``kvrelay serve --port N``."""
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), *args]
        self.startup_timeout_s = startup_timeout_s
        self.log = tempfile.NamedTemporaryFile(prefix=f"kvrelay-serve-{name}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.stop_s: float | None = None
        self.killed = False

    def start(self) -> None:
        log(f"{self.name}: starting {' '.join(shlex.quote(c) for c in self.cmd[1:])}")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_healthy(t0)

    def _wait_healthy(self, t0: float) -> None:
        assert self.proc is not None
        deadline = t0 + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: not healthy within {self.startup_timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(1.0)
        self.startup_s = time.monotonic() - t0
        log(f"{self.name}: healthy at {self.url} after {self.startup_s:.0f}s")

    def healthy(self) -> tuple[bool, Any]:
        try:
            r = httpx.get(f"{self.url}/health", timeout=10)
            return r.status_code == 200, r.json()
        except Exception as e:  # noqa: BLE001
            return False, str(e)

    def stop(self, timeout_s: float = 90.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: no exit {timeout_s:.0f}s after SIGTERM; killing its process group")
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self.stop_s = time.monotonic() - t0
        log(f"{self.name}: stopped in {self.stop_s:.0f}s (exit {self.proc.returncode})")

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""


def process_rss(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Resident memory (bytes) of every kvrelay process of the server at ``url``, from
    their own Prometheus endpoints (``process_resident_memory_bytes``): ``router`` and
    each worker by name (``prefill-0``, ...). A process that does not answer is left out."""
    from bench.loadgen import parse_prometheus

    out: dict[str, float] = {}
    groups = httpx.get(f"{url}/metrics/targets", timeout=timeout_s).json()
    for g in groups:
        for target in g["targets"]:
            try:
                text = httpx.get(f"http://{target}{g['labels'].get('__metrics_path__', '/metrics')}", timeout=timeout_s).text
            except httpx.HTTPError:
                continue
            samples = parse_prometheus(text)
            rss = next((v for n, _, v in samples if n == "process_resident_memory_bytes"), None)
            worker = next((lab["worker"] for n, lab, _ in samples if n == "kvrelay_running_requests" and "worker" in lab), None)
            if rss is not None:
                out[worker or "router"] = rss
    return out
