"""Rendered cluster files, made once per session for the infra tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import ClusterSpec, render_all

# A multi-node CoAtNet-7 spec with EFA (the stack's subnet and security group), and a smaller one without,
# on another instance type and with fewer GPUs than the node has.
SPECS = {
    "p5_efa": ClusterSpec(
        nodes=16, gpus_per_node=8, model="coatnet_7", global_batch=4096, instance_type="p5.48xlarge",
        image="123456789012.dkr.ecr.us-east-1.amazonaws.com/coatnet-pipeline:0.1.0", bucket="coatnet-test-bucket",
        subnet_id="subnet-0123456789abcdef0", security_group_id="sg-0123456789abcdef0", placement_group="coatnet-pg",
        worker_instance_profile="arn:aws:iam::123456789012:instance-profile/coatnet-worker",
        head_instance_profile="arn:aws:iam::123456789012:instance-profile/coatnet-head",
        irsa_role_arn="arn:aws:iam::123456789012:role/coatnet-irsa", overrides=("train.epochs=90",),
    ),
    "p4de_partial": ClusterSpec(
        nodes=3, gpus_per_node=4, model="coatnet_5", global_batch=3072, micro_batch=16, zero_stage=3,
        instance_type="p4de.24xlarge", name="small", namespace="ml", mlflow_db="external", efa=False,
    ),
}


class Rendered:
    def __init__(self, spec: ClusterSpec, paths: dict[str, Path]):
        self.paths = paths
        self.spec_json = json.loads(paths["spec"].read_text())
        self.input = spec

    def yaml_docs(self, key: str) -> list[dict]:
        return [d for d in yaml.safe_load_all(self.paths[key].read_text()) if d is not None]


@pytest.fixture(scope="session")
def all_rendered(tmp_path_factory) -> dict[str, Rendered]:
    return {name: Rendered(spec, render_all(spec, tmp_path_factory.mktemp(name))) for name, spec in SPECS.items()}


@pytest.fixture(scope="session", params=sorted(SPECS))
def rendered(request, all_rendered) -> Rendered:
    return all_rendered[request.param]
