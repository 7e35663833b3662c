"""deploy/serve/kvrelay.yaml: a Ray Serve config whose application is kvrelay's real
builder and whose args kvrelay's own config parser accepts."""

import importlib
import re
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


def test_serve_config_names_a_compression_preset_and_lists_them_all():
    from cluster.compression import PRESETS

    text = SERVE_CONFIG.read_text()
    (app,) = yaml.safe_load(text)["applications"]
    assert app["args"]["transfer"]["compression"] == {"preset": "none"}
    config = ClusterConfig.build(app["args"])
    assert config.transfer.compression.preset == "none" and config.transfer.compression.settings().lossless
    # The comment above the section lists every preset kvrelay knows, one a line.
    comment = text[text.index("transfer:"):text.index("compression:")]
    listed = set(re.findall(r"^\s*#\s+(\w+)\s", comment, re.M))
    assert set(PRESETS) <= listed, sorted(set(PRESETS) - listed)
