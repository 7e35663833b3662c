"""The Helm chart (helm/kvrelay), rendered and checked offline.

Oracles nobody here wrote: Helm itself (render, `lint --strict`, values.schema.json),
the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate, strict), KubeRay v1.7.0's
RayService CRD schema (made strict: unknown fields refused), Ray Serve's own config
schema, and kvrelay's ClusterConfig parser for the serve application's args.

Helm comes from the pinned helm-python-sdk (it embeds Helm); where only a `helm`
binary is installed, that is used instead."""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvrelay"
CRD = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0" / "ray.io_rayservices.yaml"  # vendored
K8S_VERSION = "1.30.0"
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor", "PrometheusRule"}  # not core Kubernetes kinds
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"  # the chart ships a copy: rules/alerts.yml
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
NAME, NAMESPACE = "demo", "llm"

# Ray Serve's own pydantic models warn about pydantic v1 idioms on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

try:
    import helm_python
except ImportError:  # pragma: no cover - depends on the environment
    helm_python = None
HELM_BIN = shutil.which("helm")
if helm_python is None and HELM_BIN is None:  # pragma: no cover
    pytest.skip("neither helm-python-sdk nor a helm binary is installed", allow_module_level=True)

# The value sets: the chart's defaults and every helm/kvrelay/ci/*-values.yaml
# (chart-testing's convention): GPU production, hostPath + chart-made Secret, colocated CPU,
# compressed KV handoffs (a preset with overrides).
VALUE_SETS: dict[str, dict] = {"default": {}}
for _p in sorted((CHART / "ci").glob("*-values.yaml")):
    VALUE_SETS[_p.name.removesuffix("-values.yaml")] = yaml.safe_load(_p.read_text()) or {}


# ---- Helm, either way ------------------------------------------------------------------


class RenderError(Exception):
    """Helm refused the values (schema) or a template failed (`fail`)."""


def _render_texts(chart: Path, values: dict, name: str) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included with the SDK only)."""
    if helm_python is not None:
        try:
            return helm_python.Chart.load(str(chart)).render(values=values, name=name, namespace=NAMESPACE)
        except (helm_python.HelmValuesError, helm_python.HelmRenderError) as e:
            raise RenderError(str(e)) from None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values, f)
        f.flush()
        proc = subprocess.run(
            [HELM_BIN, "template", name, str(chart), "-n", NAMESPACE, "-f", f.name],
            capture_output=True, text=True, timeout=60,
        )
    if proc.returncode != 0:
        raise RenderError(proc.stderr)
    texts: dict[str, str] = {}
    for doc in proc.stdout.split("\n---\n"):
        first, _, rest = doc.lstrip("-\n").partition("\n")
        if first.startswith("# Source: "):
            key = first.removeprefix("# Source: ")
            texts[key] = texts.get(key, "") + "\n---\n" + rest
    return texts


def render_objects(values: dict, chart: Path = CHART, name: str = NAME) -> list[dict]:
    objs = []
    for path, text in _render_texts(chart, values, name).items():
        if path.endswith(".txt"):
            continue
        objs.extend(d for d in yaml.safe_load_all(text) if d)
    return objs


@functools.lru_cache(maxsize=None)
def _rendered(set_name: str) -> tuple[dict, ...]:
    return tuple(render_objects(VALUE_SETS[set_name]))


def rendered(set_name: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(set_name)))


def lint(values: dict) -> dict:
    if helm_python is not None:
        return helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{K8S_VERSION}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values, f)
        f.flush()
        proc = subprocess.run([HELM_BIN, "lint", "--strict", str(CHART), "-f", f.name],
                              capture_output=True, text=True, timeout=60)
    return {"errors": [] if proc.returncode == 0 else [proc.stdout + proc.stderr], "messages": []}


def only(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def named(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def app_args(rs: dict) -> dict:
    (app,) = serve_config(rs)["applications"]
    return app["args"]


def groups(rs: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def head(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]["headGroupSpec"]


def container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def ray_start_resources(params: dict) -> dict:
    """rayStartParams.resources is a JSON object inside a double-quoted string."""
    raw = params["resources"]
    assert raw.startswith('"') and raw.endswith('"'), raw
    return json.loads(raw[1:-1].replace('\\"', '"'))


def with_values(base: dict, **changes: Any) -> dict:
    """A deep copy of base with dotted keys set: with_values({}, **{"prefill.replicas": 2})."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ---- 1. Helm: lint, render ------------------------------------------------------------


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_lint_strict_is_clean(set_name):
    report = lint(VALUE_SETS[set_name])
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_bad_values():
    report = lint({"prefill": {"replicas": -1}})
    assert report["errors"] and "/prefill/replicas" in " ".join(report["errors"])


def test_value_sets_cover_the_deployment_shapes():
    assert {"default", "gpu-prod", "hostpath", "colocated-cpu", "compression"} <= set(VALUE_SETS)


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_renders_the_expected_objects(set_name):
    values = VALUE_SETS[set_name]
    objs = rendered(set_name)
    kinds = sorted(o["kind"] for o in objs if o["kind"] != "ConfigMap")
    expected = ["RayService", "Service"]
    if values.get("apiKey", {}).get("value"):
        expected.append("Secret")
    metrics = values.get("metrics", {})
    if metrics.get("serviceMonitor", {}).get("enabled"):
        expected.append("ServiceMonitor")
    if metrics.get("podMonitor", {}).get("enabled"):
        expected.append("PodMonitor")
    if metrics.get("prometheusRule", {}).get("enabled"):
        expected.append("PrometheusRule")
    assert kinds == sorted(expected)
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kvrelay"
        assert labels["app.kubernetes.io/instance"] == NAME
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert "namespace" not in o["metadata"] or o["kind"] == "ConfigMap"


# ---- 2. Core objects against Kubernetes 1.30 -------------------------------------------


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_core_objects_are_valid_kubernetes(set_name):
    import kubernetes_validate

    core = [o for o in rendered(set_name) if o["kind"] not in CRD_KINDS]
    assert core, "no core objects rendered"
    for o in core:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_kubernetes_validate_is_strict_here():
    import kubernetes_validate

    svc = only(rendered("default"), "Service")
    svc["spec"]["ports"][0]["targetPorts"] = "serve"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)


# ---- 3. RayService against KubeRay's CRD ------------------------------------------------


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever a schema lists properties and does not
    preserve unknown fields, so a misspelled field fails instead of being dropped."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def rayservice_validator() -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_rayservice_matches_the_kuberay_crd(set_name):
    rs = only(rendered(set_name), "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in rayservice_validator().iter_errors(rs)]
    assert errors == []
    # KubeRay refuses RayService names over 47 characters or not DNS-1035 labels.
    assert len(rs["metadata"]["name"]) <= 47


@pytest.mark.parametrize("path, typo", [
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "minReplica"),
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0), "imagePullPolicyy"),
    (("spec", "rayClusterConfig"), "enableInTreeAutoscaler"),
])
def test_crd_strictness_catches_a_misspelled_field(path, typo):
    rs = only(rendered("default"), "RayService")
    node = rs
    for p in path:
        node = node[p]
    node[typo] = 1
    errors = list(rayservice_validator().iter_errors(rs))
    assert errors and any(typo in e.message for e in errors)


def test_long_release_names_fit_kuberay():
    objs = render_objects({}, name="a-very-long-release-name-for-a-production-cluster-01")
    rs = only(objs, "RayService")
    assert len(rs["metadata"]["name"]) <= 47 and not rs["metadata"]["name"].endswith("-")
    assert list(rayservice_validator().iter_errors(rs)) == []


# ---- 4. Bad values refused, in plain words ----------------------------------------------


@pytest.mark.parametrize("changes, words", [
    ({"prefill.replicas": -1}, ["/prefill/replicas", "-1"]),
    ({"decode.maxReplicas": -2}, ["/decode/maxReplicas", "-2"]),
    ({"decode.replicas": 0}, ["/decode/replicas"]),
    ({"config.router.policy": "fastest"}, ["/config/router/policy", "kv_aware"]),
    ({"model.source": "s3"}, ["/model/source", "pvc"]),
    ({"replica": 3}, ["replica", "not allowed"]),
    ({"config.engine.block_size": 24}, ["/config/engine/block_size"]),
    ({"config.engine.model": "/x"}, ["/config/engine", "model"]),  # the chart owns engine.model
    ({"config.router.api_key": "k"}, ["/config/router", "api_key"]),  # keys come from a Secret
    ({"config.pools.prefill_workers": 2}, ["/config/pools", "prefill_workers"]),
    ({"config.transfer.transport": "nccl"}, ["/config/transfer/transport"]),
    ({"config.transfer.compression.preset": "lossless"}, ["/config/transfer/compression/preset", "balanced"]),
    ({"config.transfer.compression.keep": 0}, ["/config/transfer/compression/keep"]),
    ({"config.transfer.compression.keep": 1.5}, ["/config/transfer/compression/keep"]),
    ({"config.transfer.compression.kernel": 32}, ["/config/transfer/compression/kernel"]),  # odd only
    ({"config.transfer.compression.quantization": "int2"}, ["/config/transfer/compression/quantization", "int4"]),
    ({"config.transfer.compression.group_size": 33}, ["/config/transfer/compression/group_size"]),
    ({"config.transfer.compression.budgets": "triangle"}, ["/config/transfer/compression/budgets"]),
    ({"config.transfer.compression.ratio": 4}, ["/config/transfer/compression", "ratio", "not allowed"]),
    ({"service.type": "Ingress"}, ["/service/type"]),
    ({"metrics.workerPort": 70000}, ["/metrics/workerPort"]),
    ({"metrics.prometheusRule.interval": "1m"}, ["/metrics/prometheusRule", "interval", "not allowed"]),
    ({"metrics.prometheusRule.labels": {"release": 1}}, ["/metrics/prometheusRule/labels/release"]),
    ({"metrics.prometheusRule.enabled": "yes"}, ["/metrics/prometheusRule/enabled"]),
    ({"prefill.rayStartParams": {"num-gpus": 1}}, ["/prefill/rayStartParams/num-gpus"]),
])
def test_schema_refuses_bad_values(changes, words):
    with pytest.raises(RenderError) as e:
        render_objects(with_values({}, **changes))
    message = str(e.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


@pytest.mark.parametrize("changes, words", [
    ({"prefill.minReplicas": 3, "prefill.maxReplicas": 2, "prefill.replicas": 2},
     ["prefill.minReplicas (3) must not exceed prefill.maxReplicas (2)"]),
    ({"decode.replicas": 4, "decode.maxReplicas": 2}, ["decode.replicas (4)", "decode.maxReplicas (2)"]),
    ({"prefill.replicas": 0, "prefill.minReplicas": 0}, ["prefill.replicas must be at least 1", "colocated"]),
    ({"prefill.gpus": 2, "decode.gpus": 1}, ["prefill.gpus (2) and decode.gpus (1) differ", "gpus_per_worker"]),
    ({"decode.resources": {"limits": {"nvidia.com/gpu": 1}}}, ["decode.gpus"]),
    ({"model.source": "pvc"}, ["model.pvc.claimName"]),
    ({"model.source": "hostPath"}, ["model.hostPath.path"]),
    ({"model.source": "pvc", "model.pvc.claimName": "w", "model.path": "/abs"}, ["relative to model.mountPath"]),
    ({"model.path": "weights/x.gguf"}, ["model.path", "absolute path inside the image"]),
    ({"apiKey.existingSecret": "s", "apiKey.value": "v"}, ["apiKey.existingSecret or apiKey.value"]),
    ({"metrics.enabled": False, "metrics.podMonitor.enabled": True}, ["metrics.enabled"]),
    ({"metrics.enabled": False, "metrics.prometheusRule.enabled": True}, ["metrics.prometheusRule", "metrics.enabled"]),
    ({"fullnameOverride": "9lives"}, ["DNS-1035"]),
    ({"config.pools.cpus_per_worker": 3}, ["prefill pods offer Ray 2 CPU(s)", "cpus_per_worker (3)"]),
    ({"decode.resources": {"requests": {"cpu": "1500m"}, "limits": None}, "config.pools.cpus_per_worker": 2.5,
      "prefill.rayStartParams": {"num-cpus": "3"}}, ["decode pods offer Ray 2 CPU(s)"]),
])
def test_template_refuses_what_a_schema_cannot_say(changes, words):
    with pytest.raises(RenderError) as e:
        render_objects(with_values({}, **changes))
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_worker_cpus_follow_what_kuberay_advertises():
    # KubeRay's num-cpus: rayStartParams, else the CPU limit, else the request, rounded up.
    values = with_values({}, **{"config.pools.cpus_per_worker": 2, "prefill.rayStartParams": {"num-cpus": "2"},
                                "prefill.resources": {"limits": None, "requests": {"cpu": "100m"}},
                                "decode.resources": {"limits": None, "requests": {"cpu": "1200m"}}})
    assert only(render_objects(values), "RayService")


def test_colocated_ignores_the_prefill_group_bounds():
    values = with_values(VALUE_SETS["colocated-cpu"], **{"prefill.gpus": 3, "prefill.replicas": 0})
    rs = only(render_objects(values), "RayService")
    assert list(groups(rs)) == ["decode"]


# ---- 5. The serve config is a kvrelay config -------------------------------------------


def test_import_path_is_importable():
    rs = only(rendered("default"), "RayService")
    (app,) = serve_config(rs)["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("router.serve_app", "build")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_serve_config_is_valid_for_ray_serve_and_kvrelay(set_name):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ClusterConfig
    from router.serve_app import build

    rs = only(rendered(set_name), "RayService")
    sc = serve_config(rs)
    ServeDeploySchema.model_validate(sc)
    (app,) = sc["applications"]
    assert app["route_prefix"] == "/"
    assert sc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    config = ClusterConfig.build(app["args"])  # strict: any unknown key fails here
    assert config.router.port == sc["http_options"]["port"]
    assert isinstance(build(app["args"]), serve.Application)
    assert config.router.api_key is None and "api_key" not in app["args"]["router"]
    # The router replica: no CPU, pinned to the head by the head's own custom resource.
    (dep,) = app["deployments"]
    from router.serve_app import KVRelayRouter

    assert dep["name"] == KVRelayRouter.name
    assert dep["ray_actor_options"]["num_cpus"] == 0
    head_res = ray_start_resources(head(rs)["rayStartParams"])
    (res_name, asked), = dep["ray_actor_options"]["resources"].items()
    assert 0 < asked <= head_res[res_name]


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_values_reach_the_cluster_config(set_name):
    from cluster.compression import CompressionSection
    from cluster.config import ClusterConfig

    values = VALUE_SETS[set_name]
    rs = only(rendered(set_name), "RayService")
    config = ClusterConfig.build(app_args(rs))
    vconf = values.get("config", {})
    assert config.router.policy == vconf.get("router", {}).get("policy", "kv_aware")
    assert config.engine.block_size == vconf.get("engine", {}).get("block_size", 16)
    assert config.transfer.layerwise == vconf.get("transfer", {}).get("layerwise", True)
    compression = vconf.get("transfer", {}).get("compression", {})
    assert config.transfer.compression == CompressionSection(**{"preset": "none", **compression})
    metrics = values.get("metrics", {})
    assert config.metrics.enabled == metrics.get("enabled", True)
    assert config.metrics.worker_port == metrics.get("workerPort", 9400)
    colocated = vconf.get("pools", {}).get("colocated", False)
    assert config.pools.colocated == colocated
    g = groups(rs)
    assert config.pools.decode_workers == g["decode"]["replicas"] == values.get("decode", {}).get("replicas", 1)
    assert config.pools.decode_resources == ray_start_resources(g["decode"]["rayStartParams"]) == {"kvrelay_decode": 1}
    if colocated:
        assert "prefill" not in g and config.pools.prefill_workers == 0
    else:
        assert config.pools.prefill_workers == g["prefill"]["replicas"] == values.get("prefill", {}).get("replicas", 1)
        assert config.pools.prefill_resources == ray_start_resources(g["prefill"]["rayStartParams"]) == {"kvrelay_prefill": 1}
    gpus = values.get("decode", {}).get("gpus", 0)
    assert config.pools.gpus_per_worker == gpus
    assert config.engine_config().device == ("cuda" if gpus else "cpu")
    for name, group in g.items():
        limits = container(group).get("resources", {}).get("limits", {})
        assert limits.get("nvidia.com/gpu", 0) == gpus, name


@pytest.mark.parametrize("readme", [CHART / "README.md", ROOT / "README.md"], ids=["chart", "project"])
def test_the_readme_example_installs(readme):
    from cluster.config import ClusterConfig

    text = readme.read_text()
    (block,) = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    objs = render_objects(yaml.safe_load(block))
    rs = only(objs, "RayService")
    assert list(rayservice_validator().iter_errors(rs)) == []
    config = ClusterConfig.build(app_args(rs))
    assert (config.pools.prefill_workers, config.pools.decode_workers, config.pools.gpus_per_worker) == (2, 4, 1)


def test_gpu_prod_values_reach_the_config():
    from cluster.config import ClusterConfig

    config = ClusterConfig.build(app_args(only(rendered("gpu-prod"), "RayService")))
    assert config.engine.model == "/models/Llama-3.1-8B-Instruct"
    assert config.router.served_model_name == "llama-3.1-8b"
    assert (config.engine.dtype, config.engine.attention_backend) == ("bfloat16", "flashinfer")
    assert (config.engine.kv_cache_memory_gb, config.engine.max_model_len) == (40, 32768)
    assert (config.pools.cpus_per_worker, config.pools.threads_per_worker) == (8, 4)
    assert (config.deadlines.startup_s, config.deadlines.transfer_s) == (900, 10)
    assert (config.pools.prefill_workers, config.pools.decode_workers) == (2, 4)


def test_schema_config_keys_are_cluster_config_keys():
    """values.schema.json's config.* never offers a key kvrelay would refuse, and the keys
    the chart fills itself are real ClusterConfig fields."""
    from cluster.config import ClusterConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = schema["properties"]["config"]["properties"]
    chart_owned = {
        "router": {"served_model_name", "port"},
        "engine": {"model"},
        "pools": {"prefill_workers", "decode_workers", "gpus_per_worker", "prefill_resources", "decode_resources"},
        "metrics": {"enabled", "host", "worker_port"},
    }
    fields = {name: set(f.annotation.model_fields) for name, f in ClusterConfig.model_fields.items()}
    assert set(sections) <= set(fields)
    for name, section in sections.items():
        offered = set(section["properties"])
        assert offered <= fields[name], f"config.{name}: {sorted(offered - fields[name])} unknown to kvrelay"
        assert not offered & chart_owned.get(name, set()), f"config.{name} offers chart-owned keys"
    for name, keys in chart_owned.items():
        assert keys <= fields[name], f"the chart sets {sorted(keys - fields[name])} unknown in {name}"


def test_schema_compression_matches_kvrelay():
    """config.transfer.compression offers exactly CompressionSection's keys, and its enums
    are kvrelay's presets and literals (a new preset or quantizer must reach the chart)."""
    import typing

    from cluster.compression import PRESETS, CompressionSection, CompressionSettings

    schema = json.loads((CHART / "values.schema.json").read_text())
    comp = schema["properties"]["config"]["properties"]["transfer"]["properties"]["compression"]
    assert comp["additionalProperties"] is False
    assert set(comp["properties"]) == set(CompressionSection.model_fields)
    assert comp["properties"]["preset"]["enum"] == list(PRESETS)
    for key in ("mode", "pooling", "quantization"):
        literal = typing.get_args(CompressionSettings.model_fields[key].annotation)
        assert comp["properties"][key]["enum"] == list(literal), key


def test_compression_values_reach_the_cluster_config():
    from cluster.config import ClusterConfig

    values = VALUE_SETS["compression"]["config"]["transfer"]["compression"]
    config = ClusterConfig.build(app_args(only(rendered("compression"), "RayService")))
    section = config.transfer.compression
    assert section.preset == "balanced" and section.overrides() == {k: v for k, v in values.items() if k != "preset"}
    settings = section.settings()
    assert (settings.mode, settings.quantization) == ("sparse", "int4")  # from the preset
    assert (settings.keep, settings.kernel, settings.pooling, settings.budgets) == (0.4, 31, "max", "pyramid")
    # The deployment's default carries its overrides (and says so in its metrics label);
    # a request naming another preset gets that preset as defined.
    assert section.resolve(None) == ("balanced*", settings)
    assert section.resolve("int8")[0] == "int8"


@pytest.mark.parametrize("compression", [
    {"preset": "balanced", "token_budget": 16},  # below sinks + window (4 + 32), which are always kept
    {"preset": "none", "mode": "sparse", "window": 8, "sinks": 0, "token_budget": 4},
])
def test_kvrelay_refuses_what_the_schema_lets_through(compression):
    """A combination a schema cannot check passes Helm; kvrelay's parser refuses it when
    the application is built (the deploy fails), naming the field."""
    from cluster.config import ClusterConfig

    args = app_args(only(render_objects(with_values({}, **{"config.transfer.compression": compression})), "RayService"))
    assert args["transfer"]["compression"] == compression
    with pytest.raises(ValueError) as e:
        ClusterConfig.build(args)
    assert "token_budget" in str(e.value) and "sinks + window" in str(e.value)


# ---- Placement: head hosts no workers, groups pinned by custom resources ---------------


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_head_hosts_no_worker_and_groups_are_pinned(set_name):
    rs = only(rendered(set_name), "RayService")
    params = head(rs)["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert ray_start_resources(params) == {"kvrelay_router": 1}
    for name, g in groups(rs).items():
        assert ray_start_resources(g["rayStartParams"]) == {f"kvrelay_{name}": 1}
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert container(g)["name"] == "ray-worker"
        assert g["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == name
    auto = VALUE_SETS[set_name].get("autoscaling", {}).get("enabled", False)
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is auto


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_pod_labels_leave_kuberays_own_alone(set_name):
    """KubeRay labels Ray pods app.kubernetes.io/name=kuberay and ray.io/*; a template
    label would override the former, and the latter are KubeRay's."""
    rs = only(rendered(set_name), "RayService")
    for name, pod in _pods(rs).items():
        labels = pod["template"]["metadata"]["labels"]
        assert "app.kubernetes.io/name" not in labels, name
        assert not [k for k in labels if k.startswith("ray.io/")], name
        assert labels["app.kubernetes.io/instance"] == NAME


def test_chart_keys_win_over_extra_ray_start_params():
    values = with_values({}, **{"head.rayStartParams": {"num-cpus": "8", "object-store-memory": "100000000"},
                                "decode.rayStartParams": {"resources": '"{\\"other\\": 1}"'}})
    rs = only(render_objects(values), "RayService")
    assert head(rs)["rayStartParams"]["num-cpus"] == "0"
    assert head(rs)["rayStartParams"]["object-store-memory"] == "100000000"
    assert ray_start_resources(groups(rs)["decode"]["rayStartParams"]) == {"kvrelay_decode": 1}


def test_gpu_prod_scheduling():
    rs = only(rendered("gpu-prod"), "RayService")
    values = VALUE_SETS["gpu-prod"]
    for name in ("prefill", "decode"):
        spec = groups(rs)[name]["template"]["spec"]
        assert spec["nodeSelector"] == values[name]["nodeSelector"]
        assert spec["tolerations"] == values[name]["tolerations"]
        assert container(groups(rs)[name])["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container(groups(rs)[name])["resources"]["requests"]["cpu"] == "8"
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert "affinity" in groups(rs)["prefill"]["template"]["spec"]
    head_spec = head(rs)["template"]["spec"]
    assert "nvidia.com/gpu" not in container(head(rs))["resources"]["limits"]
    assert "tolerations" not in head_spec and head_spec["nodeSelector"] == {"node-pool": "cpu"}
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert container(head(rs))["image"] == "registry.example.com/kvrelay:0.1.0-gpu"


# ---- Model source ----------------------------------------------------------------------


def _pods(rs: dict) -> dict[str, dict]:
    return {"head": head(rs), **groups(rs)}


@pytest.mark.parametrize("set_name, volume", [
    ("gpu-prod", {"name": "model", "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True}}),
    ("hostpath", {"name": "model", "hostPath": {"path": "/srv/models", "type": "Directory"}}),
])
def test_model_volume_on_every_pod(set_name, volume):
    rs = only(rendered(set_name), "RayService")
    mount_path = VALUE_SETS[set_name]["model"]["mountPath"]
    for name, pod in _pods(rs).items():
        assert volume in pod["template"]["spec"]["volumes"], name
        assert {"name": "model", "mountPath": mount_path, "readOnly": True} in container(pod)["volumeMounts"], name


def test_model_from_the_image():
    from cluster.config import ClusterConfig

    rs = only(rendered("default"), "RayService")
    assert ClusterConfig.build(app_args(rs)).engine.model == "default"
    for pod in _pods(rs).values():
        assert all(v["name"] != "model" for v in pod["template"]["spec"].get("volumes", []))
    rs = only(render_objects(with_values({}, **{"model.path": "/opt/models/m.gguf"})), "RayService")
    assert app_args(rs)["engine"]["model"] == "/opt/models/m.gguf"
    rs = only(rendered("hostpath"), "RayService")
    assert app_args(rs)["engine"]["model"] == "/weights/smollm2/SmolLM2-135M-Instruct-Q8_0.gguf"


# ---- API key ---------------------------------------------------------------------------


def _key_env(c: dict) -> list[dict]:
    return [e for e in c.get("env", []) if e["name"] == "KVRELAY_API_KEY"]


def test_api_key_from_an_existing_secret():
    objs = rendered("gpu-prod")
    rs = only(objs, "RayService")
    assert _key_env(container(head(rs))) == [{"name": "KVRELAY_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "kvrelay-api", "key": "token"}}}]
    assert not [o for o in objs if o["kind"] == "Secret"]
    for g in groups(rs).values():
        assert _key_env(container(g)) == []  # only the head, where the router runs


def test_api_key_in_a_chart_made_secret_never_in_the_serve_config():
    key = VALUE_SETS["hostpath"]["apiKey"]["value"]
    objs = rendered("hostpath")
    secret = only(objs, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == key
    rs = only(objs, "RayService")
    (env,) = _key_env(container(head(rs)))
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert key not in yaml.safe_dump(rs)


def test_no_api_key_means_no_env_and_a_warning():
    rs = only(rendered("default"), "RayService")
    assert _key_env(container(head(rs))) == []
    if helm_python is not None:
        notes = _render_texts(CHART, {}, NAME)["kvrelay/templates/NOTES.txt"]
        assert "no API key" in notes


# ---- Block-hash key ---------------------------------------------------------------------


def _seed_env(c: dict) -> list[dict]:
    return [e for e in c.get("env", []) if e["name"] == "KVRELAY_HASH_SEED"]


def test_hash_seed_from_an_existing_secret():
    objs = rendered("gpu-prod")
    rs = only(objs, "RayService")
    assert _seed_env(container(head(rs))) == [{"name": "KVRELAY_HASH_SEED", "valueFrom": {
        "secretKeyRef": {"name": "kvrelay-hash-seed", "key": "seed"}}}]
    assert not [o for o in objs if o["kind"] == "Secret"]
    for g in groups(rs).values():
        assert _seed_env(container(g)) == []  # the router (head) hands it to the workers


def test_hash_seed_in_a_chart_made_secret_kvrelay_accepts_never_in_the_serve_config(monkeypatch):
    from cluster.config import ClusterConfig
    from router.serve_app import replica_config

    def render() -> tuple[str, dict, dict]:
        objs = render_objects(with_values({}, **{"hashSeed.generate": True}))
        secret = only(objs, "Secret")
        return base64.b64decode(secret["data"]["hash-seed"]).decode(), secret, only(objs, "RayService")

    seed, secret, rs = render()
    assert secret["metadata"]["name"] == f"{NAME}-kvrelay-hash-seed"
    assert re.fullmatch(r"[0-9a-f]{64}", seed)  # 32 bytes, hex: what prefix_cache.hash_seed takes
    assert render()[0] != seed  # drawn at random (an upgrade keeps the live Secret's: lookup)
    (env,) = _seed_env(container(head(rs)))
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "hash-seed"}
    assert seed not in yaml.safe_dump(rs)
    # The router replica takes it from that env over the key drawn at deploy time.
    bound = ClusterConfig.build(app_args(rs)).with_hash_seed().model_dump()
    monkeypatch.setenv("KVRELAY_HASH_SEED", seed)
    assert replica_config(bound).prefix_cache.seed_bytes() == bytes.fromhex(seed)
    monkeypatch.delenv("KVRELAY_HASH_SEED")
    assert replica_config(bound).prefix_cache.seed_bytes() == bytes.fromhex(bound["prefix_cache"]["hash_seed"].get_secret_value())


def test_no_hash_seed_means_no_env_and_no_secret():
    objs = rendered("default")
    assert _seed_env(container(head(only(objs, "RayService")))) == []
    assert not [o for o in objs if o["kind"] == "Secret"]
    with pytest.raises(RenderError):  # generate is a boolean
        render_objects(with_values({}, **{"hashSeed.generate": "yes"}))


# ---- API Service, metrics, monitors ----------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_api_service_selects_the_head_serve_port(set_name):
    objs = rendered(set_name)
    rs = only(objs, "RayService")
    svc = named(objs, "Service")[f"{NAME}-kvrelay-api"]
    assert svc["spec"]["type"] == VALUE_SETS[set_name].get("service", {}).get("type", "ClusterIP")
    pods = _pods(rs)
    selected = [n for n, p in pods.items() if _matches(svc["spec"]["selector"], p["template"]["metadata"]["labels"])]
    assert selected == ["head"]
    (port,) = svc["spec"]["ports"]
    head_ports = {p["name"]: p["containerPort"] for p in container(head(rs))["ports"]}
    assert head_ports[port["targetPort"]] == 8000


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_worker_pods_expose_the_metrics_port(set_name):
    values = VALUE_SETS[set_name]
    rs = only(rendered(set_name), "RayService")
    enabled = values.get("metrics", {}).get("enabled", True)
    for name, g in groups(rs).items():
        ports = {p["name"]: p["containerPort"] for p in container(g).get("ports", [])}
        if enabled:
            assert ports["metrics"] == values.get("metrics", {}).get("workerPort", 9400) == app_args(rs)["metrics"]["worker_port"]
        else:
            assert "metrics" not in ports


@pytest.mark.parametrize("set_name", ["gpu-prod", "hostpath"])
def test_monitors_scrape_router_and_workers(set_name):
    objs = rendered(set_name)
    rs = only(objs, "RayService")
    values = VALUE_SETS[set_name]["metrics"]
    pods = _pods(rs)
    if values.get("serviceMonitor", {}).get("enabled"):
        sm = only(objs, "ServiceMonitor")
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        svc = named(objs, "Service")[f"{NAME}-kvrelay-api"]
        assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        (ep,) = sm["spec"]["endpoints"]
        assert ep["path"] == "/metrics" and ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    pm = only(objs, "PodMonitor")
    sel = pm["spec"]["selector"]
    (expr,) = sel["matchExpressions"]
    selected = [n for n, p in pods.items()
                if _matches(sel["matchLabels"], p["template"]["metadata"]["labels"])
                and p["template"]["metadata"]["labels"].get(expr["key"]) in expr["values"]]
    assert selected == ["prefill", "decode"]
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert (ep["port"], ep["path"]) == ("metrics", "/metrics")


@pytest.mark.parametrize("set_name", list(VALUE_SETS))
def test_monitors_validate_as_prometheus_operator_objects(set_name):
    """No CRD schema for these here: check the fields the operator requires."""
    endpoint_keys = {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    relabel_keys = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
    for o in rendered(set_name):
        if o["kind"] == "ServiceMonitor":
            assert set(o["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
            assert all(set(e) <= endpoint_keys for e in o["spec"]["endpoints"])
        if o["kind"] == "PodMonitor":
            assert set(o["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel"}
            assert all(set(e) <= endpoint_keys for e in o["spec"]["podMetricsEndpoints"])
        if o["kind"] in ("ServiceMonitor", "PodMonitor"):
            for e in o["spec"].get("endpoints", []) + o["spec"].get("podMetricsEndpoints", []):
                assert all(set(r) <= relabel_keys and r.get("targetLabel") for r in e.get("relabelings", []))
        if o["kind"] == "PrometheusRule":
            assert set(o["spec"]) == {"groups"}
            for group in o["spec"]["groups"]:
                assert set(group) <= {"name", "interval", "rules", "partial_response_strategy", "limit"}
                for rule in group["rules"]:
                    assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
                    assert isinstance(rule["expr"], str)
                    assert all(isinstance(v, str) for v in {**rule.get("labels", {}), **rule.get("annotations", {})}.values())


# ---- Alert rules: a PrometheusRule from the one rules file -------------------------------


def _alert_groups() -> list[dict]:
    return yaml.safe_load(ALERT_RULES.read_text())["groups"]


def _scrape_job() -> str:
    (job,) = [j["job_name"] for j in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]]
    return job


def test_chart_rules_are_a_copy_of_deploy_prometheus():
    """One source for the alert rules: the chart's rules/alerts.yml is byte-identical to
    deploy/prometheus/alerts.yml (promtool-tested there). After editing it: cp
    deploy/prometheus/alerts.yml helm/kvrelay/rules/alerts.yml"""
    assert (CHART / "rules" / "alerts.yml").read_bytes() == ALERT_RULES.read_bytes()


def test_prometheus_rule_carries_the_alert_rules():
    objs = rendered("gpu-prod")
    rule = only(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == f"{NAME}-kvrelay-alerts"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["labels"]["app.kubernetes.io/component"] == "alerts"
    assert "namespace" not in rule["metadata"]  # the release namespace
    # The rules as written, Go-template annotations ({{ $labels.worker }}) left for Prometheus.
    assert rule["spec"]["groups"] == _alert_groups()
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == {"KVRelayWorkerDown", "KVRelayTargetDown", "KVRelayTTFTHigh",
                           "KVRelayTransferFailures", "KVRelayKVCacheNearlyFull"}
    assert "{{ $labels.worker }}" in alerts["KVRelayWorkerDown"]["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not found")
def test_prometheus_rule_passes_promtool(tmp_path):
    rule = only(rendered("gpu-prod"), "PrometheusRule")
    path = tmp_path / "rendered.rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    proc = subprocess.run([shutil.which("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 rules found" in proc.stdout


def test_target_down_selects_the_job_the_monitors_set():
    """Under the operator the job label would be the Service's name (ServiceMonitor) or
    <namespace>/<name> (PodMonitor); both monitors relabel it to the plain config's job,
    the one KVRelayTargetDown selects, so the same rule works in both setups."""
    objs = rendered("gpu-prod")
    rule = only(objs, "PrometheusRule")
    (expr,) = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "KVRelayTargetDown"]
    assert re.fullmatch(r'up\{job="([^"]+)"\} == 0', expr).group(1) == _scrape_job()
    endpoints = only(objs, "ServiceMonitor")["spec"]["endpoints"] + only(objs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    for ep in endpoints:
        # The operator appends these after its own job relabeling, so the last one wins.
        jobs = [r for r in ep["relabelings"] if r["targetLabel"] == "job"]
        assert jobs == [{"targetLabel": "job", "replacement": _scrape_job()}]


@pytest.mark.parametrize("values", [
    {},
    {"metrics": {"prometheusRule": {"enabled": False, "labels": {"release": "prometheus"}}}},
    {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
], ids=["default", "disabled", "monitors-only"])
def test_no_prometheus_rule_unless_enabled(values):
    assert not [o for o in render_objects(values) if o["kind"] == "PrometheusRule"]


def test_prometheus_rule_in_another_namespace():
    values = {"metrics": {"prometheusRule": {"enabled": True, "namespace": "monitoring"}}}
    rule = only(render_objects(values), "PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["spec"]["groups"] == _alert_groups()


def test_notes_tell_how_to_reach_the_api_and_metrics():
    if helm_python is None:
        pytest.skip("helm template does not render NOTES.txt")
    notes = _render_texts(CHART, VALUE_SETS["gpu-prod"], NAME)["kvrelay/templates/NOTES.txt"]
    assert f"port-forward svc/{NAME}-kvrelay-api 8000:8000" in notes
    assert 'curl -s http://127.0.0.1:8000/v1/models -H "Authorization: Bearer $KVRELAY_API_KEY"' in notes
    assert "get secret kvrelay-api" in notes and "{.data.token}" in notes
    assert "/metrics" in notes and "9400" in notes


def test_notes_tell_the_compression_preset():
    if helm_python is None:
        pytest.skip("helm template does not render NOTES.txt")
    notes = _render_texts(CHART, {}, NAME)["kvrelay/templates/NOTES.txt"]
    assert "KV compression (config.transfer.compression): preset none." in notes
    assert '"kv_compression": none | int8 | fp8 | int4 | balanced | max' in notes
    notes = _render_texts(CHART, VALUE_SETS["compression"], NAME)["kvrelay/templates/NOTES.txt"]
    assert "preset balanced, overriding budgets, group_size, guard, keep, kernel" in notes
    assert 'preset label reads "balanced*"' in notes


# ---- 6. Grafana dashboards --------------------------------------------------------------


def _dashboard_configmaps(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("app.kubernetes.io/component") == "dashboards"]


def test_one_configmap_per_dashboard_file_in_the_chart():
    files = sorted((CHART / "dashboards").glob("*.json"))
    cms = _dashboard_configmaps(rendered("default"))
    assert len(cms) == len(files)
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert key.endswith(".json") and json.loads(text)


def test_dashboards_from_a_chart_copy(tmp_path):
    chart = tmp_path / "kvrelay"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("dashboards"))
    # Zero files (and no folder at all): nothing rendered.
    assert _dashboard_configmaps(render_objects({}, chart=chart)) == []
    (chart / "dashboards").mkdir()
    boards = {
        "kvrelay_overview.json": {"title": "kvrelay overview", "uid": "kvrelay-overview", "schemaVersion": 39,
                                  "panels": [{"type": "timeseries", "title": "TTFT",
                                              "targets": [{"expr": "sum(rate(kvrelay_requests_total[5m]))"}]}]},
        "KV-transfer.json": {"title": "KV transfer", "uid": "kvrelay-kv", "schemaVersion": 39, "panels": []},
    }
    for name, board in boards.items():
        (chart / "dashboards" / name).write_text(json.dumps(board, indent=2))
    (chart / "dashboards" / "README.md").write_text("not a dashboard")
    values = {"dashboards": {"label": "grafana_dashboard", "labelValue": "1", "annotations": {"grafana_folder": "kvrelay"}}}
    objs = render_objects(values, chart=chart)
    cms = {cm["metadata"]["name"]: cm for cm in _dashboard_configmaps(objs)}
    assert sorted(cms) == [f"{NAME}-kvrelay-dashboard-kv-transfer", f"{NAME}-kvrelay-dashboard-kvrelay-overview"]
    by_title = {}
    for cm in cms.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "kvrelay"}
        ((key, text),) = cm["data"].items()
        board = json.loads(text)
        by_title[board["title"]] = (key, board)
    assert by_title["kvrelay overview"] == ("kvrelay-overview.json", boards["kvrelay_overview.json"])
    assert by_title["KV transfer"] == ("kv-transfer.json", boards["KV-transfer.json"])
    import kubernetes_validate

    for cm in cms.values():
        kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    # Another sidecar label; or none at all.
    objs = render_objects({"dashboards": {"label": "kvrelay_dashboard", "labelValue": "yes"}}, chart=chart)
    assert all(cm["metadata"]["labels"]["kvrelay_dashboard"] == "yes" for cm in _dashboard_configmaps(objs))
    assert _dashboard_configmaps(render_objects({"dashboards": {"enabled": False}}, chart=chart)) == []
