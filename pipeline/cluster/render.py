"""Write every cluster file from one resolved spec, after checking each against its schema."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from pipeline.cluster import aws, kuberay, ray_launcher, services
from pipeline.cluster.entrypoint import MLFLOW_PORT, pretrain_argv
from pipeline.cluster.schemas import validate_manifest, validate_ray_cluster_config
from pipeline.cluster.spec import ClusterSpec, resolve

FILES = {
    "spec": "spec.json",
    "ray_cluster": "ray/cluster.yaml",
    "ray_submit": "ray/submit.sh",
    "raycluster": "kubernetes/raycluster.yaml",
    "rayjob": "kubernetes/rayjob.yaml",
    "services": "kubernetes/services.yaml",
    "aws_stack": "aws/bucket-stack.yaml",
}


class _Dumper(yaml.SafeDumper):
    # Shared sub-dicts would become YAML anchors/aliases, which CloudFormation rejects and people misread.
    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):  # long commands stay readable as block scalars
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(docs: list[dict], header: str) -> str:
    body = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)
    return header + body


def _header(spec: ClusterSpec, what: str, apply: str) -> str:
    return (
        f"# {what}\n"
        f"# Rendered by `coatnet cluster render` for {spec.model} at {spec.img_size} on {spec.nodes} x "
        f"{spec.gpus_per_node} GPUs ({spec.instance_type}): world size {spec.world_size}, global batch "
        f"{spec.global_batch} = micro-batch {spec.micro_batch} x {spec.world_size} x accumulation "
        f"{spec.grad_accum}, ZeRO-{spec.zero_stage}, streaming cache {spec.cache_limit} per node.\n"
        f"# Re-render rather than edit, so that every file keeps the same numbers. Apply: {apply}\n"
    )


def submit_script(spec: ClusterSpec) -> str:
    """Submit the training job to the launcher's cluster through Ray Jobs (dashboard port-forwarded by Ray)."""
    argv = pretrain_argv(spec, tracking_uri=f"http://${{HEAD_IP}}:{MLFLOW_PORT}")
    # Every argument quoted except the tracking URI, which needs the head's private address expanded here.
    quoted = " ".join(shlex.quote(a) if "${HEAD_IP}" not in a else f'"{a}"' for a in argv)
    return f"""#!/usr/bin/env bash
# Submit {spec.model} pretraining to the Ray cluster started with `ray up ray/cluster.yaml`.
# Rendered by `coatnet cluster render`; run from the directory that holds ray/cluster.yaml.
set -euo pipefail
CLUSTER_YAML="${{CLUSTER_YAML:-$(dirname "$0")/cluster.yaml}}"
# The head's private address, from the tags the Ray launcher puts on its instances (MLflow runs there).
HEAD_IP=$(aws ec2 describe-instances --region {shlex.quote(spec.region)} \\
  --filters "Name=tag:ray-cluster-name,Values={spec.name}" "Name=tag:ray-node-type,Values=head" \\
  "Name=instance-state-name,Values=running" \\
  --query 'Reservations[0].Instances[0].PrivateIpAddress' --output text)
ray dashboard "$CLUSTER_YAML" --port 8265 > /dev/null 2>&1 &
FORWARD=$!
trap 'kill $FORWARD' EXIT
sleep 5
ray job submit --address http://127.0.0.1:8265 --no-wait -- {quoted}
"""


def render_all(spec: ClusterSpec, out: str | Path) -> dict[str, Path]:
    """Resolve ``spec``, render every file, validate each, then write them under ``out``.

    Nothing is written when any check fails.
    """
    spec = resolve(spec)
    out = Path(out)
    ray_cfg = ray_launcher.render_ray_cluster(spec)
    validate_ray_cluster_config(ray_cfg)
    raycluster = kuberay.render_raycluster(spec)
    rayjob = kuberay.render_rayjob(spec)
    svc = services.render_services(spec)
    for doc in [raycluster, rayjob, *svc]:
        validate_manifest(doc)
    stack = aws.render_stack(spec)

    texts = {
        "spec": json.dumps(spec.as_dict(), indent=2, sort_keys=True) + "\n",
        "ray_cluster": dump_yaml([ray_cfg], _header(spec, "Ray cluster launcher config (AWS)",
                                                    "ray up ray/cluster.yaml")),
        "ray_submit": submit_script(spec),
        "raycluster": dump_yaml([raycluster], _header(spec, "KubeRay RayCluster (long-lived; the Prefect worker "
                                                            "submits to it)", "kubectl apply -f")),
        "rayjob": dump_yaml([rayjob], _header(spec, "KubeRay RayJob (its own cluster, deleted when the job ends)",
                                              "kubectl apply -f")),
        "services": dump_yaml(svc, _header(spec, "Shared services: MLflow (+ Postgres) and the Prefect worker",
                                           "kubectl apply -f")),
        "aws_stack": dump_yaml([stack], _header(spec, "CloudFormation stack: bucket, IAM, EFA security group",
                                                "aws cloudformation deploy --template-file")),
    }
    paths = {}
    for key, text in texts.items():
        path = out / FILES[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if key == "ray_submit":
            path.chmod(0o755)
        paths[key] = path
    return paths
