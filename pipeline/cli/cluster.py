"""`coatnet cluster`: render the cluster files from one spec, and print the sizing table."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cluster import ClusterSpec, SpecError, format_table, render_all, sizing_table
from pipeline.cluster.sizing import format_zero_table, zero_plans
from pipeline.cluster.spec import DEFAULT_CONFIG


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cluster", help="render Ray/KubeRay/AWS cluster files; size large runs",
                              description="Infra-as-code for multi-node pretraining (see infra/README.md).")
    sub = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    r = sub.add_parser("render", help="write the Ray launcher, KubeRay, services and AWS stack files")
    r.add_argument("--nodes", type=int, required=True, help="GPU nodes")
    r.add_argument("--gpus-per-node", type=int, required=True)
    r.add_argument("--model", required=True, help="e.g. coatnet_7")
    r.add_argument("--img-size", type=int, default=224)
    r.add_argument("--global-batch", type=int, default=4096)
    r.add_argument("--micro-batch", type=int, default=None, help="default: the largest the memory estimate fits")
    r.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="default: from the memory estimate")
    r.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--instance-type", default="p5.48xlarge")
    r.add_argument("--image", default="coatnet-pipeline:0.1.0", help="the image built from infra/docker/Dockerfile")
    r.add_argument("--bucket", default="coatnet-pipeline")
    r.add_argument("--region", default="us-east-1")
    r.add_argument("--name", default="coatnet", help="Ray cluster name")
    r.add_argument("--namespace", default="coatnet")
    r.add_argument("--config", default=None, help="training recipe, relative to the repository root")
    r.add_argument("--dataset", default="shards/in21k", help="shard prefix in the bucket")
    r.add_argument("--run-name", default="")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `coatnet pretrain` override (repeatable)")
    r.add_argument("--head-instance-type", default="m6i.4xlarge")
    r.add_argument("--cpu-instance-type", default="c6i.16xlarge")
    r.add_argument("--cpu-workers-max", type=int, default=8)
    r.add_argument("--cache-fraction", type=float, default=0.8, help="share of node NVMe for the shard cache")
    r.add_argument("--ami", default="")
    r.add_argument("--subnet-id", default="", help="with --security-group-id: EFA interfaces (stack output)")
    r.add_argument("--security-group-id", default="")
    r.add_argument("--placement-group", default="")
    r.add_argument("--worker-instance-profile", default="", help="ARN (stack output WorkerInstanceProfileArn)")
    r.add_argument("--head-instance-profile", default="", help="ARN (stack output HeadInstanceProfileArn)")
    r.add_argument("--irsa-role-arn", default="", help="IAM role of the Kubernetes service account")
    r.add_argument("--mlflow-db", choices=["postgres", "external"], default="postgres")
    r.add_argument("--prefect-pool", default="coatnet-process", help="work pool (prefect.yaml uses coatnet-process)")
    r.add_argument("--no-efa", action="store_true", help="do not request EFA devices")
    r.add_argument("--out", default="infra/rendered", help="output directory")
    r.set_defaults(func=_render)

    s = sub.add_parser("sizing", help="estimated ZeRO stage, micro-batch, nodes and wall-clock per model")
    s.add_argument("--models", nargs="+", default=["coatnet_5", "coatnet_6", "coatnet_7"])
    s.add_argument("--img-sizes", nargs="+", type=int, default=[224, 512])
    s.add_argument("--instance-type", default="p5.48xlarge")
    s.add_argument("--target-days", type=float, default=14.0)
    s.add_argument("--max-nodes", type=int, default=64)
    s.add_argument("--global-batch", type=int, default=4096)
    s.add_argument("--zero-gpus", nargs="+", type=int, default=[8, 16, 64],
                   help="GPU counts of the ZeRO table (stage, offload, micro-batch, checkpointing per model)")
    s.add_argument("--zero-instance-type", default="p5e.48xlarge", help="GPU nodes of the ZeRO table")
    s.add_argument("--json", action="store_true", help="one JSON object per row instead of the markdown tables")
    s.set_defaults(func=_sizing)


def _render(args: argparse.Namespace) -> int:
    spec = ClusterSpec(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, model=args.model, img_size=args.img_size,
        global_batch=args.global_batch, micro_batch=args.micro_batch, zero_stage=args.zero_stage,
        activation_checkpointing=args.activation_checkpointing, instance_type=args.instance_type,
        name=args.name, region=args.region, bucket=args.bucket, image=args.image, namespace=args.namespace,
        config=args.config or DEFAULT_CONFIG, dataset=args.dataset, run_name=args.run_name,
        overrides=tuple(args.override), head_instance_type=args.head_instance_type,
        cpu_instance_type=args.cpu_instance_type, cpu_workers_max=args.cpu_workers_max,
        cache_fraction=args.cache_fraction, ami=args.ami, subnet_id=args.subnet_id,
        security_group_id=args.security_group_id, placement_group=args.placement_group,
        worker_instance_profile=args.worker_instance_profile, head_instance_profile=args.head_instance_profile,
        irsa_role_arn=args.irsa_role_arn, mlflow_db=args.mlflow_db, prefect_pool=args.prefect_pool,
        efa=not args.no_efa,
    )
    try:
        paths = render_all(spec, args.out)
    except SpecError as e:
        print(f"coatnet cluster render: {e}", file=sys.stderr)
        return 2
    resolved = json.loads(paths["spec"].read_text())
    print(
        f"{resolved['model']} at {resolved['img_size']}: {resolved['nodes']} x {resolved['gpus_per_node']} GPUs "
        f"({resolved['instance_type']}), world size {resolved['world_size']}, global batch "
        f"{resolved['global_batch']} = micro {resolved['micro_batch']} x {resolved['world_size']} x accum "
        f"{resolved['grad_accum']}, ZeRO-{resolved['zero_stage']}, activation checkpointing "
        f"{'on' if resolved['activation_checkpointing'] else 'off'}, cache {resolved['cache_limit']}/node"
    )
    if not resolved["launcher_efa"] and resolved["kubernetes_efa"]:
        print("note: ray/cluster.yaml has no EFA interfaces; pass --subnet-id and --security-group-id "
              "(the AWS stack's outputs) for multi-node NCCL over EFA")
    for key, path in paths.items():
        print(f"  {key:12s} {path}")
    return 0


def _sizing(args: argparse.Namespace) -> int:
    try:
        rows = sizing_table(args.models, args.img_sizes, instance_type=args.instance_type,
                            target_days=args.target_days, max_nodes=args.max_nodes, global_batch=args.global_batch)
        zero = zero_plans(args.models, args.zero_gpus, instance_type=args.zero_instance_type)
    except ValueError as e:
        print(f"coatnet cluster sizing: {e}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps({"table": "wall-clock", **row.as_dict()}))
        for what, plan in zero:
            print(json.dumps({"table": "zero", "run": what, **(plan.as_dict() if plan else {"fits": False})}))
    else:
        print(format_table(rows))
        print()
        print(format_zero_table(zero))
    return 0
