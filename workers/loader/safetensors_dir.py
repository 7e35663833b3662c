"""Read a Hugging Face checkpoint directory: config.json + *.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from workers.model.config import ModelConfig

if TYPE_CHECKING:
    import torch  # imported where tensors are made: reading a config needs no torch


def read_config(directory: Path, name: str) -> ModelConfig:
    with open(directory / "config.json") as f:
        return ModelConfig.from_hf_dict(json.load(f), name=name)


def tensor_names(directory: Path) -> list[tuple[Path, str]]:
    out = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.extend((file, k) for k in f.keys())
    return out


def iter_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
