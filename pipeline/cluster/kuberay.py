"""KubeRay manifests (apiVersion ray.io/v1): a long-lived RayCluster and a self-contained RayJob.

Both have the launcher's shape: a head pod that takes no work, an autoscaling CPU worker group for
preprocessing and a fixed GPU worker group whose pods each take a whole node's worth of the spec's GPUs,
the EFA devices that go with them, and the node's instance-store NVMe as the streaming cache.
"""

from __future__ import annotations

import math

import yaml

from pipeline.cluster.entrypoint import (
    APP_DIR,
    NVME_MOUNT,
    RESERVED_CPUS,
    mlflow_tracking_uri,
    pretrain_command,
    training_env,
)
from pipeline.cluster.instances import GiB, get_instance
from pipeline.cluster.spec import ClusterSpec

API_VERSION = "ray.io/v1"
RESERVED_MEMORY = 0.1


def labels(spec: ClusterSpec, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "coatnet", "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/component": component}


def _env(spec: ClusterSpec, *, efa: bool) -> list[dict]:
    env = training_env(spec, efa=efa)
    env["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri(spec)
    return [{"name": k, "value": v} for k, v in env.items()]


def _container(spec: ClusterSpec, name: str, resources: dict, *, efa: bool, ports: list | None = None,
               mounts: list | None = None) -> dict:
    c = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": APP_DIR,
        "env": _env(spec, efa=efa),
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # Let Ray drain the node before the pod goes away.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if ports:
        c["ports"] = ports
    if mounts:
        c["volumeMounts"] = mounts
    return c


def _shm(size_gib: int) -> dict:
    # Streaming keeps its shared state and DataLoader workers pass batches through /dev/shm.
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{size_gib}Gi"}}


def _cpu_pod_resources(instance_type: str) -> dict:
    t = get_instance(instance_type)
    return {"cpu": str(max(t.vcpus - 2, 1)), "memory": f"{int(t.memory_gib * (1 - RESERVED_MEMORY))}Gi"}


def gpu_pod_resources(spec: ClusterSpec) -> dict:
    """One pod per GPU node, with its share of the node when the spec uses fewer GPUs than the node has."""
    inst = spec.instance
    share = spec.gpus_per_node / inst.gpus
    res = {
        "cpu": str(max(math.floor((inst.vcpus - RESERVED_CPUS) * share), 1)),
        "memory": f"{int(inst.memory_gib * (1 - RESERVED_MEMORY) * share)}Gi",
        "nvidia.com/gpu": str(spec.gpus_per_node),
        "ephemeral-storage": f"{nvme_volume_gib(spec)}Gi",
    }
    if spec.kubernetes_efa:
        res["vpc.amazonaws.com/efa"] = str(max(int(inst.efa_interfaces * share), 1))
    return res


def nvme_volume_gib(spec: ClusterSpec) -> int:
    """The pod's NVMe volume: the streaming cache plus room for local checkpoints (the rest of 95%)."""
    return int(spec.nvme_share_bytes * 0.95 // GiB)


def raycluster_spec(spec: ClusterSpec) -> dict:
    inst = spec.instance
    head = get_instance(spec.head_instance_type)
    pod_common = {"serviceAccountName": spec.service_account}
    head_pod = {
        **pod_common,
        "nodeSelector": {"node.kubernetes.io/instance-type": spec.head_instance_type},
        "containers": [_container(
            spec, "ray-head", _cpu_pod_resources(spec.head_instance_type), efa=False,
            ports=[{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                   {"containerPort": 10001, "name": "client"}],
            mounts=[{"name": "dshm", "mountPath": "/dev/shm"}],
        )],
        "volumes": [_shm(max(head.memory_gib // 4, 1))],
    }
    cpu_pod = {
        **pod_common,
        "nodeSelector": {"node.kubernetes.io/instance-type": spec.cpu_instance_type},
        "containers": [_container(spec, "ray-worker", _cpu_pod_resources(spec.cpu_instance_type), efa=False,
                                  mounts=[{"name": "dshm", "mountPath": "/dev/shm"}])],
        "volumes": [_shm(max(get_instance(spec.cpu_instance_type).memory_gib // 4, 1))],
    }
    gpu_pod = {
        **pod_common,
        "nodeSelector": {"node.kubernetes.io/instance-type": spec.instance_type},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [_container(
            spec, "ray-worker", gpu_pod_resources(spec), efa=spec.kubernetes_efa,
            mounts=[{"name": "nvme", "mountPath": NVME_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}],
        )],
        "volumes": [
            # On nodes whose kubelet keeps ephemeral storage on the RAID-0 of instance-store disks.
            {"name": "nvme", "emptyDir": {"sizeLimit": f"{nvme_volume_gib(spec)}Gi"}},
            _shm(int(inst.memory_gib * (spec.gpus_per_node / inst.gpus) // 4)),
        ],
    }
    return {
        "rayVersion": spec.ray_version,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            # num-cpus 0: the head takes no tasks, so preprocessing and training land on workers.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {"metadata": {"labels": labels(spec, "ray-head")}, "spec": head_pod},
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu-workers",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": spec.cpu_workers_max,
                "rayStartParams": {},
                "template": {"metadata": {"labels": labels(spec, "ray-cpu-worker")}, "spec": cpu_pod},
            },
            {
                "groupName": "gpu-workers",
                # Fixed size: DeepSpeed's world size is set at launch, autoscaling GPU pods would not join it.
                "replicas": spec.nodes,
                "minReplicas": spec.nodes,
                "maxReplicas": spec.nodes,
                "rayStartParams": {"num-gpus": str(spec.gpus_per_node)},
                "template": {"metadata": {"labels": labels(spec, "ray-gpu-worker")}, "spec": gpu_pod},
            },
        ],
    }


def render_raycluster(spec: ClusterSpec) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec, "ray-cluster")},
        "spec": raycluster_spec(spec),
    }


def render_rayjob(spec: ClusterSpec) -> dict:
    env = training_env(spec, efa=spec.kubernetes_efa)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": f"{spec.name}-pretrain", "namespace": spec.namespace,
                     "labels": labels(spec, "ray-job")},
        "spec": {
            "entrypoint": pretrain_command(spec, tracking_uri=mlflow_tracking_uri(spec)),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}, sort_keys=True),
            # The job resumes from its newest checkpoint (--resume auto), so a retry loses at most one interval.
            "backoffLimit": 2,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": raycluster_spec(spec),
        },
    }
