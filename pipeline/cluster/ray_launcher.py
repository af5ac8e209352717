"""The Ray cluster launcher file (`ray up`) for AWS: CPU head, autoscaling CPU workers, fixed GPU nodes.

Every node runs the project's image (infra/docker/Dockerfile) in Docker, so the launcher and KubeRay run
the same software; the host's instance-store NVMe is striped and mounted into the containers for the
streaming cache. The head runs the MLflow server next to Ray's head processes.
"""

from __future__ import annotations

import re
import shlex

from pipeline.cluster.entrypoint import MLFLOW_PORT, NVME_MOUNT, training_env
from pipeline.cluster.instances import get_instance
from pipeline.cluster.spec import ClusterSpec

# Runs on the host before Docker starts: RAID-0 over the instance-store disks (none on the head or the CPU
# workers: then a plain directory on the root volume).
NVME_SETUP = (
    f"if ! mountpoint -q {NVME_MOUNT}; then "
    "DEVS=$(lsblk -dpno NAME,MODEL | awk '/Instance Storage/{print $1}'); N=$(echo $DEVS | wc -w); "
    f"sudo mkdir -p {NVME_MOUNT}; "
    "if [ \"$N\" -gt 1 ]; then sudo mdadm --create /dev/md0 --level=0 --raid-devices=$N $DEVS --run "
    "&& sudo mkfs.xfs -f /dev/md0 && sudo mount /dev/md0 " + NVME_MOUNT + "; "
    "elif [ \"$N\" -eq 1 ]; then sudo mkfs.xfs -f $DEVS && sudo mount $DEVS " + NVME_MOUNT + "; fi; "
    f"sudo chmod 1777 {NVME_MOUNT}; fi"
)

_ECR = re.compile(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/")

HEAD = "head"
CPU_WORKERS = "cpu_workers"
GPU_WORKERS = "gpu_workers"


def _node_config(spec: ClusterSpec, instance_type: str, *, root_gib: int, profile: str) -> dict:
    cfg: dict = {
        "InstanceType": instance_type,
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": root_gib, "VolumeType": "gp3", "Encrypted": True}}
        ],
    }
    if spec.ami:
        cfg["ImageId"] = spec.ami
    if spec.subnet_id and not (instance_type == spec.instance_type and spec.launcher_efa):
        # Every node in the stack's subnet and security group, so the head reaches the EFA nodes.
        cfg["SubnetIds"] = [spec.subnet_id]
        cfg["SecurityGroupIds"] = [spec.security_group_id]
    if profile:
        cfg["IamInstanceProfile"] = {"Arn": profile}
    return cfg


def _mlflow_start(spec: ClusterSpec) -> str:
    store = f"sqlite:///{NVME_MOUNT}/mlflow/mlflow.db"
    if spec.mlflow_db == "external":
        # The URI (with its password) stays in Secrets Manager; the head's instance profile may read it.
        store = (
            "$(python -c \"import boto3; print(boto3.client('secretsmanager').get_secret_value("
            f"SecretId='{spec.name}/mlflow-db')['SecretString'])\")"
        )
    return (
        f"mkdir -p {NVME_MOUNT}/mlflow && (nohup mlflow server --backend-store-uri \"{store}\" "
        f"--artifacts-destination {spec.mlflow_artifacts_uri} --host 0.0.0.0 --port {MLFLOW_PORT} "
        f"> {NVME_MOUNT}/mlflow/server.log 2>&1 &)"
    )


def _registry_login(image: str) -> list[str]:
    """Docker login to ECR with the instance profile's rights (the stack grants ECR read), before the pull."""
    m = _ECR.match(image)
    if not m:
        return []
    registry = image.split("/", 1)[0]
    return [f"aws ecr get-login-password --region {m.group(2)} | docker login --username AWS --password-stdin {registry}"]


def render_ray_cluster(spec: ClusterSpec) -> dict:
    """The `ray up` config as a dict (validated against Ray's schema by the renderer)."""
    inst = spec.instance
    gpu_node = _node_config(spec, spec.instance_type, root_gib=500, profile=spec.worker_instance_profile)
    if spec.placement_group:
        gpu_node["Placement"] = {"GroupName": spec.placement_group}
    gpu_docker: dict = {}
    if spec.launcher_efa:
        # All EFA interfaces in the stack's subnet and EFA security group; the first carries the IP address.
        gpu_node["NetworkInterfaces"] = [
            {
                "DeviceIndex": 0 if i == 0 else 1,
                "NetworkCardIndex": i,
                "InterfaceType": "efa",
                "SubnetId": spec.subnet_id,
                "Groups": [spec.security_group_id],
                "DeleteOnTermination": True,
            }
            for i in range(inst.efa_interfaces)
        ]
        env = training_env(spec, efa=True)
        gpu_docker["worker_run_options"] = ["--privileged"] + [f"-e {k}={v}" for k, v in env.items()
                                                               if k.startswith("FI_")]
    env = training_env(spec, efa=False)
    run_options = ["--ulimit nofile=65536:65536", f"-v {NVME_MOUNT}:{NVME_MOUNT}"]
    run_options += [f"-e {k}={shlex.quote(v)}" for k, v in env.items()]

    gpu_type = {
        "node_config": gpu_node,
        "resources": {"CPU": inst.vcpus, "GPU": spec.gpus_per_node},
        "min_workers": spec.nodes,
        "max_workers": spec.nodes,
    }
    if gpu_docker:
        gpu_type["docker"] = gpu_docker
    cpu = get_instance(spec.cpu_instance_type)
    return {
        "cluster_name": spec.name,
        "max_workers": spec.nodes + spec.cpu_workers_max,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "docker": {
            "image": spec.image,
            "container_name": "coatnet",
            "pull_before_run": True,
            "run_options": run_options,
        },
        "provider": {
            "type": "aws",
            "region": spec.region,
            # Terminate instead of stopping: stopped p5 nodes keep their EBS bill and lose the NVMe cache.
            "cache_stopped_nodes": False,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            HEAD: {
                "node_config": _node_config(spec, spec.head_instance_type, root_gib=200,
                                            profile=spec.head_instance_profile),
                # No training or preprocessing tasks on the head: it runs the GCS, the job drivers and MLflow.
                "resources": {"CPU": 0},
                "min_workers": 0,
                "max_workers": 0,
            },
            CPU_WORKERS: {
                "node_config": _node_config(spec, spec.cpu_instance_type, root_gib=200,
                                            profile=spec.worker_instance_profile),
                "resources": {"CPU": cpu.vcpus},
                "min_workers": 0,
                "max_workers": spec.cpu_workers_max,
            },
            GPU_WORKERS: gpu_type,
        },
        "head_node_type": HEAD,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [NVME_SETUP, *_registry_login(spec.image)],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            _mlflow_start(spec),
            "ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
