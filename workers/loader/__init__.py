"""Weight loading: locate a checkpoint, read its config and tensors, build the model."""

from workers.loader.loader import LoadedModel, load_model, random_model
from workers.loader.source import ModelSource, resolve_model

__all__ = ["LoadedModel", "ModelSource", "load_model", "random_model", "resolve_model"]
