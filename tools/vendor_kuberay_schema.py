"""Vendor the RayService schema from KubeRay's published CRD, for validating deploy/kubernetes/ offline.

    python tools/vendor_kuberay_schema.py ray.io_rayservices.yaml v1.7.0 > deploy/kubernetes/schemas/rayservice-v1.json

The CRD (ray-operator/config/crd/bases/ray.io_rayservices.yaml at the KubeRay tag) holds the served `ray.io/v1`
version's openAPIV3Schema. Two changes make it a useful offline check:
- the pod templates (head group, each worker group) become plain objects here: tests/deploy validates them
  separately as Kubernetes PodTemplateSpecs with kubernetes-validate, against the cluster version's own schemas,
  which is also what the API server does with them;
- every object that lists its properties and does not preserve unknown fields gets additionalProperties: false,
  as the API server's strict field validation (kubectl's default) rejects unknown fields: a misspelt key fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

POD_TEMPLATE_PATHS = (
    ("properties", "spec", "properties", "rayClusterConfig", "properties", "headGroupSpec", "properties", "template"),
    (
        "properties", "spec", "properties", "rayClusterConfig", "properties", "workerGroupSpecs", "items",
        "properties", "template",
    ),
)  # fmt: skip
POD_TEMPLATE_STUB = {"type": "object", "description": "a PodTemplateSpec, validated with kubernetes-validate"}


def strict(schema: dict) -> dict:
    """additionalProperties: false on every listed-properties object that keeps no unknown fields."""
    for value in schema.values():  # sub-schemas, and the `properties` maps that hold them
        if isinstance(value, dict):
            strict(value)
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def vendor(crd: dict, tag: str, version: str = "v1") -> dict:
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "RayService":
        raise ValueError("not the RayService CustomResourceDefinition")
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"the CRD has no version {version!r} (it has {', '.join(versions)})")
    schema = versions[version]["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)  # written by the operator, never by a manifest
    for path in POD_TEMPLATE_PATHS:
        parent = schema
        for key in path[:-1]:
            parent = parent[key]
        if path[-1] not in parent:
            raise ValueError(f"the CRD has no pod template at {'.'.join(path)}")
        parent[path[-1]] = dict(POD_TEMPLATE_STUB)
    schema = strict(schema)
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["properties"]["kind"] = {"const": "RayService"}
    schema["$comment"] = f"KubeRay {tag} ray.io_rayservices.yaml, {version}; made by tools/vendor_kuberay_schema.py"
    return schema


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("crd", help="KubeRay's ray.io_rayservices.yaml")
    p.add_argument("tag", help="the KubeRay release it comes from (recorded in the schema)")
    args = p.parse_args(argv)
    with open(args.crd) as f:
        crd = yaml.safe_load(f)
    json.dump(vendor(crd, args.tag), sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
