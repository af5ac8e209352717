"""Compact structural schemas of the Kubernetes kinds the renderer writes, and the Ray launcher check.

No Kubernetes API server or CRD download is available offline, so these JSON Schemas encode the parts of
the upstream definitions that a wrong file would get wrong: KubeRay's RayCluster/RayJob required fields
(headGroupSpec.template, rayStartParams, workerGroupSpecs with groupName/replicas/min/max), container images
and GPU requests, and the required fields of the core kinds. The Ray launcher file is checked with Ray's
own schema and defaults (``ray.autoscaler._private.util``).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?$"},
                       {"type": "integer", "minimum": 0}]}
_ENV = {
    "type": "array",
    "items": {
        "type": "object", "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
            "value": {"type": "string"},
            "valueFrom": {"type": "object", "minProperties": 1},
        },
        "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
        "additionalProperties": False,
    },
}
_RESOURCES = {
    "type": "object",
    "properties": {"requests": {"type": "object", "additionalProperties": _QUANTITY},
                   "limits": {"type": "object", "additionalProperties": _QUANTITY}},
    "additionalProperties": False,
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": _NAME,
        "image": {"type": "string", "minLength": 1, "pattern": r"^[^\s]+$"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": _ENV,
        "resources": _RESOURCES,
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": {"type": "integer"}}}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
_POD_SPEC = {
    "type": "object",
    "required": ["containers"],
    "properties": {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "serviceAccountName": _NAME,
    },
}
_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": _POD_SPEC}}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _NAME, "namespace": _NAME}}


def _doc(api: str, kind: str, spec: dict | None = None, required_spec: bool = True) -> dict:
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"] + (["spec"] if required_spec else []),
        "properties": {"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": _METADATA},
    }
    if spec is not None:
        schema["properties"]["spec"] = spec
    return schema


RAYCLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": {
            "type": "object", "required": ["template", "rayStartParams"],
            "properties": {"template": _TEMPLATE, "rayStartParams": _START_PARAMS},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "template", "rayStartParams"],
                "properties": {
                    "groupName": _NAME,
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _START_PARAMS,
                    "template": _TEMPLATE,
                },
            },
        },
    },
}

SCHEMAS: dict[tuple[str, str], dict] = {
    ("ray.io/v1", "RayCluster"): _doc("ray.io/v1", "RayCluster", RAYCLUSTER_SPEC),
    ("ray.io/v1", "RayJob"): _doc("ray.io/v1", "RayJob", {
        "type": "object",
        "required": ["entrypoint", "rayClusterSpec"],
        "properties": {
            "entrypoint": {"type": "string", "minLength": 1},
            "runtimeEnvYAML": {"type": "string"},
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "backoffLimit": {"type": "integer", "minimum": 0},
            "rayClusterSpec": RAYCLUSTER_SPEC,
        },
    }),
    ("v1", "Namespace"): _doc("v1", "Namespace", required_spec=False),
    ("v1", "ServiceAccount"): _doc("v1", "ServiceAccount", required_spec=False),
    ("v1", "Service"): _doc("v1", "Service", {
        "type": "object", "required": ["selector", "ports"],
        "properties": {"ports": {"type": "array", "minItems": 1,
                                 "items": {"type": "object", "required": ["port"]}}},
    }),
    ("apps/v1", "Deployment"): _doc("apps/v1", "Deployment", {
        "type": "object", "required": ["selector", "template"],
        "properties": {"replicas": {"type": "integer", "minimum": 0}, "template": _TEMPLATE},
    }),
    ("apps/v1", "StatefulSet"): _doc("apps/v1", "StatefulSet", {
        "type": "object", "required": ["selector", "template", "serviceName"],
        "properties": {"replicas": {"type": "integer", "minimum": 0}, "template": _TEMPLATE,
                       "volumeClaimTemplates": {"type": "array"}},
    }),
}


class ManifestError(ValueError):
    """A rendered manifest that does not match the structure of its kind."""


def _check_selectors(doc: dict) -> None:
    # A Deployment/StatefulSet whose selector does not match its pod labels is rejected by the API server.
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet"):
        want = spec["selector"].get("matchLabels", {})
        have = spec["template"].get("metadata", {}).get("labels", {})
        if any(have.get(k) != v for k, v in want.items()):
            raise ManifestError(f"{doc['kind']} {doc['metadata']['name']}: selector {want} does not match pod labels")


def _check_ray_groups(spec: dict, where: str) -> None:
    for g in spec.get("workerGroupSpecs", []):
        if not g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
            raise ManifestError(f"{where} group {g['groupName']}: need minReplicas <= replicas <= maxReplicas")
        for c in g["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and res.get("requests", {}).get("nvidia.com/gpu", gpus) != gpus:
                raise ManifestError(f"{where} group {g['groupName']}: GPU requests must equal limits")


def validate_manifest(doc: Any) -> None:
    """Raise ManifestError unless ``doc`` matches the structural schema of its apiVersion/kind."""
    if not isinstance(doc, dict):
        raise ManifestError(f"a manifest must be a mapping, got {type(doc).__name__}")
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = SCHEMAS.get(key)
    if schema is None:
        raise ManifestError(f"no schema for apiVersion {key[0]!r} kind {key[1]!r}")
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        raise ManifestError(f"{key[1]} {doc.get('metadata', {}).get('name')}: {path or '(top)'}: {e.message}") from None
    _check_selectors(doc)
    if key[1] == "RayCluster":
        _check_ray_groups(doc["spec"], "RayCluster")
    if key[1] == "RayJob":
        _check_ray_groups(doc["spec"]["rayClusterSpec"], "RayJob")


def validate_ray_cluster_config(config: dict) -> dict:
    """Check a `ray up` config as Ray does: fill Ray's AWS defaults, then Ray's JSON schema and rules.

    Returns the config with defaults filled (what `ray up` would use).
    """
    # lazy: Ray takes seconds to import; only this check needs its autoscaler
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(config))  # the file as written
    filled = prepare_config(copy.deepcopy(config))
    validate_config(filled)
    return filled
