"""The RayJob's entrypoint is a command the real `coatnet` CLI accepts, with overrides the recipe accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

from pipeline.cli import build_parser
from pipeline.cluster.entrypoint import APP_DIR
from pipeline.train.config import batch_split, load_config

REPO = Path(__file__).resolve().parents[2]


def _entrypoint_argv(rendered) -> list[str]:
    (job,) = rendered.yaml_docs("rayjob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "coatnet"
    return argv[1:]


def test_rayjob_entrypoint_parses_with_the_cli(rendered):
    s = rendered.spec_json
    args = build_parser().parse_args(_entrypoint_argv(rendered))
    assert args.command == "pretrain"
    assert args.config == f"{APP_DIR}/{s['config']}"
    assert args.launcher == "ray"
    assert args.num_workers == s["world_size"]
    assert args.gpus_per_worker == 1
    # Ray reserves each worker's CPUs out of what the GPU node advertises, leaving room for Ray itself.
    assert args.cpus_per_worker * s["gpus_per_node"] < rendered.yaml_docs("ray_cluster")[0][
        "available_node_types"]["gpu_workers"]["resources"]["CPU"]
    (rc,) = rendered.yaml_docs("raycluster")
    (gpu,) = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    pod_cpus = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert args.cpus_per_worker * s["gpus_per_node"] < pod_cpus
    assert args.resume == "auto"


def test_overrides_are_valid_recipe_keys_and_give_the_specs_batch_split(rendered):
    s = rendered.spec_json
    args = build_parser().parse_args(_entrypoint_argv(rendered))
    overrides = [a for a in _entrypoint_argv(rendered) if "=" in a and not a.startswith("-")]
    assert set(overrides) <= set(args.overrides)
    # The recipe named in the entrypoint exists in the repository, and our overrides load into it.
    cfg = load_config(REPO / s["config"], overrides, check_data=False)
    assert cfg.model.name == s["model"]
    assert cfg.deepspeed.zero_stage == s["zero_stage"]
    assert cfg.model.grad_checkpointing == s["activation_checkpointing"]
    assert cfg.data.root == f"s3://{s['bucket']}/{s['dataset']}"
    assert batch_split(cfg, s["world_size"]) == (s["micro_batch"], s["grad_accum"])
    assert s["micro_batch"] * s["world_size"] * s["grad_accum"] == s["global_batch"]


def test_runbook_coatnet_commands_parse_with_the_cli():
    """Every `coatnet ...` command in the runbook's code blocks is one the CLI accepts."""
    import re

    text = (REPO / "infra" / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            m = re.search(r"\bcoatnet (cluster|shard|pretrain)\b.*", line)
            if m:
                commands.append(m.group(0).split("  #")[0])
    assert len(commands) >= 4
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.command in ("cluster", "shard", "pretrain"), command
