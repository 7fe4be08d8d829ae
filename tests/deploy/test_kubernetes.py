"""deploy/kubernetes/, validated offline: every built-in resource against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), the KubeRay RayService against the schema vendored from
KubeRay's CRD, its pod templates as Kubernetes PodTemplateSpecs, and the numbers that must agree with pllm-serve
(probes on /health, the grace period above the drain, the HPA's metric served by the adapter rule)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pllm.runtime.server.cli import CONNECTIONS_CLOSE_TIMEOUT_S
from pllm.runtime.server.cli_args import args_from_options, build_parser

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
RAYSERVICE_SCHEMA = MANIFESTS / "schemas" / "rayservice-v1.json"
# The oldest Kubernetes the manifests target (the preStop `sleep` action is on by default from 1.30) and the newest
# whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Seconds, beyond the drain and the connections' close, that a pod needs to abort what is left and stop its engine.
TEARDOWN_MARGIN_S = 10


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def resource(kind: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def container_args(container: dict) -> object:
    """The container's pllm-serve command line, parsed by pllm-serve's own parser."""
    return build_parser().parse_args(container["args"])


def test_the_manifests_are_there():
    kinds = sorted(d["kind"] for _, d in documents())
    assert kinds == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "RayService", "Service",
    ]  # fmt: skip


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_match_the_kubernetes_schemas(version):
    checked = 0
    for _, doc in documents():
        if doc["apiVersion"].startswith("ray.io/"):
            continue  # a custom resource: its schema is KubeRay's (below)
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field
        checked += 1
    assert checked == 5


def test_strict_validation_rejects_a_misspelt_field():
    deployment = resource("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_deployment_probes_health_and_outlasts_the_drain():
    pod = resource("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container_args(container)
    assert args.host == "0.0.0.0" and args.build_dir == "/models/build"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = pre_stop + args.shutdown_timeout + CONNECTIONS_CLOSE_TIMEOUT_S
    assert pod["terminationGracePeriodSeconds"] >= drain + TEARDOWN_MARGIN_S
    # a draining pod answers 503 on /health for the whole drain: liveness must not restart it meanwhile
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > args.shutdown_timeout + CONNECTIONS_CLOSE_TIMEOUT_S
    assert container["readinessProbe"]["failureThreshold"] == 1  # out of the Service on the first 503
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] == resources["limits"]["memory"]
    assert args.kv_cache_memory is not None  # on CPU, the RAM-fraction default would read the node, not the pod
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0


def test_service_routes_to_the_deployment_pods():
    service, deployment = resource("Service"), resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == resource("PersistentVolumeClaim")["metadata"]["name"]


def test_hpa_scales_the_deployment_on_the_waiting_gauge_the_adapter_serves():
    hpa, deployment = resource("HorizontalPodAutoscaler"), resource("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pllm"}
    assert deployment["metadata"]["name"] == "pllm"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    served_as = metric["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load(resource("ConfigMap")["data"]["config.yaml"])["rules"]
    series = re.match(r"([\w:]+)\{", rule["seriesQuery"]).group(1)
    assert series == "pllm:num_requests_waiting"  # the gauge pllm-serve exports (runtime/server/metrics.py)
    assert re.fullmatch(rule["name"]["matches"], series) and rule["name"]["as"] == served_as
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a per-pod metric, as type Pods needs


def test_rayservice_matches_kuberays_schema():
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    assert schema["$comment"].startswith("KubeRay v")
    service = resource("RayService")
    jsonschema.validate(service, schema)
    broken = yaml.safe_load(yaml.safe_dump(service))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4  # misspelt: must fail
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(broken, schema)


def test_rayservice_pod_templates_are_valid_pod_templates():
    cluster = resource("RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(wrapped, version, strict=True)


def test_rayservice_serve_config_names_pllms_application_builder():
    service = resource("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    path = ROOT / Path(*module.split(".")[1:]).with_suffix(".py")
    assert module.split(".")[0] == "pllm" and path.is_file(), app["import_path"]
    # read, not imported: the module needs ray, which the core install does not have
    tree = ast.parse(path.read_text())
    assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, app["import_path"]
    args = args_from_options(app["args"])  # the builder's own check of its arguments
    assert args.kv_cache_memory is not None  # on CPU, the RAM-fraction default would read the node, not the pod
    (deployment,) = app["deployments"]
    assert deployment["ray_actor_options"]["num_cpus"] >= 1
    rayversion = service["spec"]["rayClusterConfig"]["rayVersion"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve]=={rayversion}"' in pyproject  # the image's ray is the cluster's ray


def test_rayservice_replicas_can_fill_their_engines_batch():
    ray_serve = pytest.importorskip("pllm.runtime.server.ray_serve", reason="ray is not installed (pllm[ray])")
    (app,) = yaml.safe_load(resource("RayService")["spec"]["serveConfigV2"])["applications"]
    (deployment,) = app["deployments"]
    batch = args_from_options(app["args"]).max_num_seqs
    # Serve sends a replica at most max_ongoing_requests at once: a full batch, and the control requests beside it
    assert deployment["max_ongoing_requests"] >= ray_serve.replica_max_ongoing_requests(batch)
    assert deployment["max_ongoing_requests"] > deployment["autoscaling_config"]["target_ongoing_requests"]


def test_rayservice_serve_config_matches_rays_schema():
    schema = pytest.importorskip("ray.serve.schema", reason="ray is not installed (pip install pllm[ray])")
    config = yaml.safe_load(resource("RayService")["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.model_validate(config)  # raises, naming the field
