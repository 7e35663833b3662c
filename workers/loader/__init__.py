"""Weight loading: locate a checkpoint, read its config and tensors, build the model.

``resolve_model`` and ``read_model_config`` are torch-free (the router uses them);
the weight loaders are imported on first use."""

from workers.loader.source import ModelSource, resolve_model

__all__ = ["LoadedModel", "ModelSource", "load_model", "random_model", "read_model_config", "resolve_model"]


def __getattr__(name: str):
    if name in ("LoadedModel", "load_model", "random_model"):
        from workers.loader import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'workers.loader' has no attribute {name!r}")


def read_model_config(source: ModelSource):
    """The architecture alone (no weights read): for the router's context checks."""
    if source.kind == "gguf":
        from workers.loader import gguf_file

        return gguf_file.read_config(gguf_file.open_gguf(source.path), source.model_id)
    from workers.loader import safetensors_dir

    return safetensors_dir.read_config(source.path, source.model_id)
