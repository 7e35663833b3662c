"""deploy/serve/kvrelay.yaml: a Ray Serve config whose application is kvrelay's real
builder and whose args kvrelay's own config parser accepts."""

import importlib
from pathlib import Path

import yaml

from cluster.config import ClusterConfig

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve" / "kvrelay.yaml"


def test_serve_config_points_at_the_builder_with_valid_args():
    doc = yaml.safe_load(SERVE_CONFIG.read_text())
    (app,) = doc["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    config = ClusterConfig.build(app["args"])
    assert config.router.port == doc["http_options"]["port"]
    assert config.router.policy == "kv_aware"
