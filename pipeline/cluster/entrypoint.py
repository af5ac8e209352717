"""The training command that every rendered file runs: `coatnet pretrain` through Ray Train.

Built once here so that the Ray launcher's submit script, the KubeRay RayJob and the runbook run the same
command, with the same numbers as the cluster that runs it. The overrides use the keys of
``pipeline.train.config`` (dotted KEY=VALUE).
"""

from __future__ import annotations

import shlex

from pipeline.cluster.spec import ClusterSpec
from pipeline.launch_options import LaunchOptions

# Node-local NVMe: mounted by the launcher's setup commands (RAID-0 of the instance-store disks) and by the
# KubeRay pods (an emptyDir on nodes whose ephemeral storage is the instance store).
NVME_MOUNT = "/mnt/nvme"
CACHE_DIR = f"{NVME_MOUNT}/streaming-cache"
RUNS_DIR = f"{NVME_MOUNT}/runs"
MLFLOW_PORT = 5000
# Where infra/docker/Dockerfile puts the repository in the image (configs/ are read from there).
APP_DIR = "/home/ray/coatnet-pipeline"


def mlflow_tracking_uri(spec: ClusterSpec) -> str:
    return f"http://mlflow.{spec.namespace}.svc.cluster.local:{MLFLOW_PORT}"


RESERVED_CPUS = 8  # CPUs per node kept back from pods (kubelet, daemon sets) and from Ray workers


def cpus_per_worker(spec: ClusterSpec) -> int:
    """CPUs Ray reserves for each training worker (one per GPU), so preprocessing tasks cannot crowd them."""
    node_cpus = spec.instance.vcpus * spec.gpus_per_node // spec.instance.gpus  # the spec's share of the node
    # One reserve for the kubelet/daemon sets (the pod's limit leaves it), one for Ray's own processes and the
    # Ray Train controller inside the pod or node.
    return max((node_cpus - 2 * RESERVED_CPUS) // spec.gpus_per_node, 1)


def train_overrides(spec: ClusterSpec, *, tracking_uri: str) -> list[str]:
    """KEY=VALUE overrides that make the recipe match this cluster (model, batch split, ZeRO, storage)."""
    run = spec.resolved_run_name
    items = [
        f"name={run}",
        f"model.name={spec.model}",
        f"model.img_size={spec.img_size}",
        f"model.grad_checkpointing={'true' if spec.activation_checkpointing else 'false'}",
        f"train.global_batch_size={spec.global_batch}",
        f"train.micro_batch_size={spec.micro_batch}",
        f"deepspeed.zero_stage={spec.zero_stage}",
        f"data.root={spec.data_uri}",
        f"data.cache_dir={CACHE_DIR}/{run}",
        f"data.cache_limit={spec.cache_limit}",
        # Decoding and augmentation run in DataLoader workers: use the node's CPUs that go with each GPU.
        f"data.num_workers={min(cpus_per_worker(spec) - 2, 16)}",
        f"output_dir={RUNS_DIR}/{run}",
        f"checkpoint.upload_uri={spec.output_uri}",
        f"logging.mlflow_tracking_uri={tracking_uri}",
        "logging.progress_bar=false",  # log lines, not a redrawn bar, in Ray job logs
    ]
    return items + list(spec.overrides)


def pretrain_argv(spec: ClusterSpec, *, tracking_uri: str, ray_address: str = "auto") -> list[str]:
    """argv of `coatnet pretrain` on the cluster: one Ray Train worker per GPU."""
    launch = LaunchOptions(launcher="ray", num_workers=spec.world_size, gpus_per_worker=1,
                           cpus_per_worker=cpus_per_worker(spec))
    return [
        "coatnet", "pretrain",
        "--config", f"{APP_DIR}/{spec.config}",
        *launch.to_argv(),
        "--ray-address", ray_address,
        "--resume", "auto",
        *train_overrides(spec, tracking_uri=tracking_uri),
    ]


def pretrain_command(spec: ClusterSpec, *, tracking_uri: str, ray_address: str = "auto") -> str:
    return shlex.join(pretrain_argv(spec, tracking_uri=tracking_uri, ray_address=ray_address))


def training_env(spec: ClusterSpec, *, efa: bool) -> dict[str, str]:
    """Environment of the training processes: NCCL over EFA where the nodes have it, the bucket's region.

    No credentials: S3 access comes from the instance profile (Ray launcher) or IRSA (Kubernetes).
    """
    env = {
        "PYTHONUNBUFFERED": "1",
        "AWS_REGION": spec.region,
        "AWS_DEFAULT_REGION": spec.region,
        "NCCL_DEBUG": "WARN",
    }
    if efa:
        # libfabric's EFA provider with GPUDirect RDMA (p4d/p5); fork safety because Ray and the
        # DataLoader workers fork after the provider is loaded.
        env.update({"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"})
    return env
