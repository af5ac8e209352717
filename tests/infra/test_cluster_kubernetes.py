"""Every rendered Kubernetes manifest against the structure of its kind, and against the spec's numbers."""

from __future__ import annotations

import copy

import pytest
from streaming.base.util import bytes_to_int

from pipeline.cluster import ManifestError, validate_manifest
from pipeline.cluster.entrypoint import mlflow_tracking_uri
from pipeline.cluster.instances import GiB, get_instance
from pipeline.cluster.spec import ClusterSpec


def _all_docs(rendered) -> list[dict]:
    return [d for key in ("raycluster", "rayjob", "services") for d in rendered.yaml_docs(key)]


def _group(cluster_spec: dict, name: str) -> dict:
    (g,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name]
    return g


def test_every_manifest_matches_its_kind(rendered):
    docs = _all_docs(rendered)
    for doc in docs:
        validate_manifest(doc)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "Deployment", "Namespace", "RayCluster", "RayJob", "Service", "ServiceAccount"]
    if rendered.spec_json["mlflow_db"] == "postgres":
        expected += ["Service", "StatefulSet"]
    assert kinds == sorted(expected)
    assert {d["apiVersion"] for d in docs if d["kind"].startswith("Ray")} == {"ray.io/v1"}
    ns = rendered.spec_json["namespace"]
    assert all(d["metadata"].get("namespace", ns) == ns for d in docs)


@pytest.mark.parametrize("breakage", ["no_head_template", "no_group_name", "replicas_above_max", "no_image",
                                      "gpu_request_differs", "no_entrypoint", "selector_mismatch"])
def test_structural_schema_rejects_broken_manifests(rendered, breakage):
    (rc,) = rendered.yaml_docs("raycluster")
    (job,) = rendered.yaml_docs("rayjob")
    svc = rendered.yaml_docs("services")
    doc = copy.deepcopy(job if breakage == "no_entrypoint" else rc)
    gpu = _group(doc["spec"].get("rayClusterSpec", doc["spec"]), "gpu-workers")
    if breakage == "no_head_template":
        del doc["spec"]["headGroupSpec"]["template"]
    elif breakage == "no_group_name":
        del gpu["groupName"]
    elif breakage == "replicas_above_max":
        gpu["replicas"] = gpu["maxReplicas"] + 1
    elif breakage == "no_image":
        del gpu["template"]["spec"]["containers"][0]["image"]
    elif breakage == "gpu_request_differs":
        gpu["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "1"
    elif breakage == "no_entrypoint":
        del doc["spec"]["entrypoint"]
    elif breakage == "selector_mismatch":
        doc = copy.deepcopy(next(d for d in svc if d["kind"] == "Deployment"))
        doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "other"
    validate_manifest(copy.deepcopy(rc))  # the unbroken one passes
    with pytest.raises(ManifestError):
        validate_manifest(doc)


def test_ray_groups_carry_the_specs_numbers(rendered):
    s = rendered.spec_json
    inst = get_instance(s["instance_type"])
    (rc,) = rendered.yaml_docs("raycluster")
    (job,) = rendered.yaml_docs("rayjob")
    # One shape: the RayJob's own cluster is the RayCluster's.
    assert job["spec"]["rayClusterSpec"] == rc["spec"]
    spec = rc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = _group(spec, "gpu-workers")
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == s["nodes"]
    (c,) = gpu["template"]["spec"]["containers"]
    for side in ("requests", "limits"):
        assert c["resources"][side]["nvidia.com/gpu"] == str(s["gpus_per_node"])
        assert ("vpc.amazonaws.com/efa" in c["resources"][side]) == s["kubernetes_efa"]
    assert gpu["template"]["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": s["instance_type"]}
    cpu = _group(spec, "cpu-workers")
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (0, s["cpu_workers_max"])
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {s["image"]}
    # The streaming cache fits in the pod's NVMe volume, which is a share of the node's instance store.
    volume = next(v for v in gpu["template"]["spec"]["volumes"] if v["name"] == "nvme")
    size = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi")) * GiB
    cache = bytes_to_int(s["cache_limit"])
    share = inst.nvme_bytes * s["gpus_per_node"] / inst.gpus
    assert cache < size <= share
    assert abs(cache - share * s["cache_fraction"]) < GiB
    assert {"name": "nvme", "mountPath": "/mnt/nvme"} in c["volumeMounts"]


def test_services_wire_mlflow_prefect_and_ray_together(rendered):
    s = rendered.spec_json
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered.yaml_docs("services")}
    mlflow = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["command"] == ["mlflow"] and mlflow["args"][0] == "server"
    assert f"s3://{s['bucket']}/mlflow" in mlflow["args"]
    store = mlflow["args"][mlflow["args"].index("--backend-store-uri") + 1]
    if s["mlflow_db"] == "postgres":
        assert store.startswith("postgresql://") and "$(MLFLOW_DB_PASSWORD)" in store
        assert ("StatefulSet", "mlflow-postgres") in docs
    else:
        assert store == "$(MLFLOW_DB_URI)"
    worker = docs[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["command"][worker["command"].index("--pool") + 1] == s["prefect_pool"]
    env = {e["name"]: e for e in worker["env"]}
    # The worker reaches the RayCluster's head service (KubeRay names it <cluster>-head-svc).
    assert env["RAY_ADDRESS"]["value"] == f"http://{s['name']}-head-svc.{s['namespace']}.svc.cluster.local:8265"
    assert env["PREFECT_API_URL"]["valueFrom"]["secretKeyRef"]["name"] == "prefect-api"
    sa = docs[("ServiceAccount", s["service_account"])]
    if s["irsa_role_arn"]:
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == s["irsa_role_arn"]


def test_mlflow_arguments_parse_with_mlflows_own_cli(rendered):
    from mlflow.cli import server

    (dep,) = [d for d in rendered.yaml_docs("services") if d["metadata"]["name"] == "mlflow" and d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    ctx = server.make_context("server", list(args[1:]))
    assert ctx.params["port"] == 5000
    assert ctx.params["artifacts_destination"] == f"s3://{rendered.spec_json['bucket']}/mlflow"
    # The tracking URI the jobs use passes MLflow's own Host-header guard; a foreign host does not.
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = ctx.params["allowed_hosts"].split(",")
    host = mlflow_tracking_uri(ClusterSpec(nodes=1, gpus_per_node=1, model="x", namespace=rendered.spec_json["namespace"]))
    assert is_allowed_host_header(allowed, host.split("//", 1)[1])
    assert is_allowed_host_header(allowed, "10.1.2.3:5000")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
