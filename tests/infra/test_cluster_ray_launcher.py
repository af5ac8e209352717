"""The rendered `ray up` file against Ray's own schema and launcher code, and its agreement with the spec."""

from __future__ import annotations

import copy
import json
import os

import jsonschema
import pytest
import ray.autoscaler
from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces
from ray.autoscaler._private.commands import prepare_config
from ray.autoscaler._private.util import validate_config

from pipeline.cluster.instances import get_instance


def ray_schema() -> dict:
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_validates_against_rays_json_schema(rendered):
    (cfg,) = rendered.yaml_docs("ray_cluster")
    jsonschema.validate(cfg, ray_schema())
    # What `ray up` does before launching anything: fill the AWS defaults, merge, validate again.
    filled = prepare_config(copy.deepcopy(cfg))
    validate_config(filled)
    assert filled["head_node_type"] == "head"


def test_schema_check_is_not_vacuous(rendered):
    (cfg,) = rendered.yaml_docs("ray_cluster")
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_workers"]["resources"]["GPU"] = "8"  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())
    broken = copy.deepcopy(cfg)
    broken["worker_nodes"] = {}  # a legacy key the schema forbids
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_node_groups_match_the_spec(rendered):
    (cfg,) = rendered.yaml_docs("ray_cluster")
    s = rendered.spec_json
    types = cfg["available_node_types"]
    gpu = types["gpu_workers"]
    assert gpu["node_config"]["InstanceType"] == s["instance_type"]
    assert gpu["min_workers"] == gpu["max_workers"] == s["nodes"]
    assert gpu["resources"]["GPU"] == s["gpus_per_node"]
    assert types["head"]["resources"]["CPU"] == 0
    assert types["cpu_workers"]["min_workers"] == 0
    assert types["cpu_workers"]["max_workers"] == s["cpu_workers_max"]
    assert cfg["max_workers"] == s["nodes"] + s["cpu_workers_max"]
    assert cfg["docker"]["image"] == s["image"]
    assert cfg["provider"] == {"type": "aws", "region": s["region"], "cache_stopped_nodes": False}
    # The streaming cache directory is on the NVMe mount that every container gets.
    assert "-v /mnt/nvme:/mnt/nvme" in cfg["docker"]["run_options"]
    assert any("mdadm --create" in c for c in cfg["initialization_commands"])
    # An ECR image is pulled after a docker login with the instance profile's rights.
    ecr = ".dkr.ecr." in s["image"]
    assert any("docker login" in c for c in cfg["initialization_commands"]) == ecr


def test_efa_interfaces_are_what_rays_aws_bootstrap_accepts(rendered):
    (cfg,) = rendered.yaml_docs("ray_cluster")
    node = cfg["available_node_types"]["gpu_workers"]["node_config"]
    s = rendered.spec_json
    if not s["launcher_efa"]:
        assert "NetworkInterfaces" not in node
        assert "docker" not in cfg["available_node_types"]["gpu_workers"]
        return
    nics = node["NetworkInterfaces"]
    assert len(nics) == get_instance(s["instance_type"]).efa_interfaces
    assert [n["NetworkCardIndex"] for n in nics] == list(range(len(nics)))
    assert {n["InterfaceType"] for n in nics} == {"efa"}
    # Ray's own bootstrap step for NetworkInterfaces (no AWS call): subnet and groups must come from the NICs.
    merged = _configure_subnets_and_groups_from_network_interfaces(node)
    assert merged["SubnetIds"] == [s["subnet_id"]] * len(nics)
    assert node["Placement"] == {"GroupName": s["placement_group"]}
    assert node["IamInstanceProfile"] == {"Arn": s["worker_instance_profile"]}
    run_opts = cfg["available_node_types"]["gpu_workers"]["docker"]["worker_run_options"]
    assert "-e FI_PROVIDER=efa" in run_opts
    # The head and the CPU workers join the same security group so they reach the EFA nodes.
    for name in ("head", "cpu_workers"):
        assert cfg["available_node_types"][name]["node_config"]["SecurityGroupIds"] == [s["security_group_id"]]


def test_submit_script_runs_the_same_training_command(rendered):
    text = rendered.paths["ray_submit"].read_text()
    s = rendered.spec_json
    assert os.access(rendered.paths["ray_submit"], os.X_OK)
    assert "ray job submit" in text
    assert f"--num-workers {s['world_size']}" in text
    assert f"train.micro_batch_size={s['micro_batch']}" in text
    assert f"Values={s['name']}" in text
