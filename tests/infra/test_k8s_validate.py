"""The rendered Kubernetes files as Kubernetes itself would take them, checked offline.

Core objects (Namespace, ServiceAccount, Deployment, Service, StatefulSet) against the API's own OpenAPI
schema through `kubernetes-validate`, in strict mode (unknown fields rejected, as `kubectl apply` does by
default); the KubeRay objects against the `ray.io/v1` schema of KubeRay's published CRDs (tests/infra/kuberay),
also with unknown fields rejected. Names and labels against the API server's syntax rules.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest

KUBERNETES_VERSIONS = ("1.34", "1.37")  # EKS's oldest in standard support late 2026, and the newest release
KUBERAY_VERSION = "v1.7.0"
SCHEMA = Path(__file__).parent / "kuberay" / "ray.io_v1.schema.json"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _docs(rendered) -> list[dict]:
    return [d for key in ("raycluster", "rayjob", "services") for d in rendered.yaml_docs(key)]


def _core(rendered) -> list[dict]:
    return [d for d in _docs(rendered) if not d["apiVersion"].startswith("ray.io/")]


def _strict(node):
    """Reject unknown fields where the CRD lists its fields (the API server's strict field validation)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.Draft202012Validator]:
    doc = json.loads(SCHEMA.read_text())
    assert KUBERAY_VERSION in doc["$comment"]
    defs = _strict(doc["$defs"])
    return {kind: jsonschema.Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": defs})
            for kind in doc["kinds"]}


def _kuberay_errors(validators, doc: dict) -> list[str]:
    errors = validators[doc["kind"]].iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_for_current_kubernetes(rendered, version):
    kv = pytest.importorskip("kubernetes_validate")
    docs = _core(rendered)
    assert {"Deployment", "Service", "Namespace", "ServiceAccount"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            assert kv.validate(doc, version, strict=True) == version
        except kv.ValidationError as e:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} on Kubernetes {version}: {e}") from None


def test_kubernetes_validate_rejects_what_the_api_server_would(rendered):
    kv = pytest.importorskip("kubernetes_validate")
    dep = next(d for d in _core(rendered) if d["kind"] == "Deployment")
    bad_type = copy.deepcopy(dep)
    bad_type["spec"]["replicas"] = "one"
    unknown = copy.deepcopy(dep)
    unknown["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy_"] = "Always"
    for doc in (bad_type, unknown):
        with pytest.raises(kv.ValidationError):
            kv.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_kuberay_objects_validate_against_the_published_crds(rendered, kuberay_validators):
    docs = [d for d in _docs(rendered) if d["apiVersion"] == "ray.io/v1"]
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob"]
    for doc in docs:
        assert _kuberay_errors(kuberay_validators, doc) == [], doc["kind"]


@pytest.mark.parametrize("breakage", ["unknown_field", "start_param_not_string", "bad_quantity", "no_containers"])
def test_the_crd_schema_rejects_broken_ray_objects(rendered, kuberay_validators, breakage):
    (rc,) = copy.deepcopy(rendered.yaml_docs("raycluster"))
    gpu = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    if breakage == "unknown_field":
        gpu["minReplica"] = 1  # a typo the API server would refuse in strict mode
    elif breakage == "start_param_not_string":
        gpu["rayStartParams"]["num-gpus"] = 8
    elif breakage == "bad_quantity":
        gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    elif breakage == "no_containers":
        del rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert _kuberay_errors(kuberay_validators, rc)


def test_names_and_labels_follow_the_api_servers_rules(rendered):
    for doc in _docs(rendered):
        meta = doc["metadata"]
        name = meta["name"]
        assert len(name) <= 253 and DNS1123_SUBDOMAIN.match(name), (doc["kind"], name)
        if doc["kind"] in ("Service", "Namespace", "RayCluster"):
            # Services and namespaces are DNS labels; KubeRay names the head's Service `<cluster>-head-svc`.
            for n in (name, f"{name}-head-svc") if doc["kind"] == "RayCluster" else (name,):
                assert len(n) <= 63 and DNS1035_LABEL.match(n), (doc["kind"], n)
        for labels in _label_maps(doc):
            for k, v in labels.items():
                assert len(v) <= 63 and LABEL_VALUE.match(v), (doc["kind"], k, v)


def _label_maps(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("labels", "matchLabels", "selector") and isinstance(v, dict) and \
                    all(isinstance(x, str) for x in v.values()):
                found.append(v)
            found += _label_maps(v)
    elif isinstance(node, list):
        for v in node:
            found += _label_maps(v)
    return found
