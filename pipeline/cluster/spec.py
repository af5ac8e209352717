"""One cluster spec from which every cluster file is rendered, and the checks that refuse impossible ones.

The spec is the single source of the numbers that must agree across files: nodes x GPUs per node is the
DeepSpeed world size (Ray Train workers, KubeRay replicas, the launcher's GPU node count), the global batch
is split into micro-batch x world size x gradient accumulation, and the streaming cache limit is a share of
the node-local NVMe that the pods/instances actually mount.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.cluster import sizing
from pipeline.cluster.instances import GiB, InstanceType, get_instance
from pipeline.errors import UserError

DEFAULT_CONFIG = "configs/pretrain/coatnet_4_in21k.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SpecError(UserError, ValueError):
    """A cluster spec that cannot work; the message says what to change."""


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    model: str
    img_size: int = 224
    global_batch: int = 4096
    micro_batch: int | None = None  # None: the largest that the sizing estimate fits
    zero_stage: int | None = None  # None: from the sizing estimate
    activation_checkpointing: bool | None = None  # None: from the sizing estimate
    instance_type: str = "p5.48xlarge"
    name: str = "coatnet"
    region: str = "us-east-1"
    bucket: str = "coatnet-pipeline"
    image: str = "coatnet-pipeline:0.1.0"  # built from infra/docker/Dockerfile and pushed to your registry
    namespace: str = "coatnet"
    config: str = DEFAULT_CONFIG
    dataset: str = "shards/in21k"  # key prefix in the bucket
    run_name: str = ""  # "" -> "{model}_in21k_{img_size}"
    overrides: tuple[str, ...] = ()  # extra KEY=VALUE passed to `coatnet pretrain`
    head_instance_type: str = "m6i.4xlarge"
    cpu_instance_type: str = "c6i.16xlarge"
    cpu_workers_max: int = 8
    cache_fraction: float = 0.8  # share of node-local NVMe given to the streaming cache
    ami: str = ""  # "" -> Ray's default Deep Learning AMI for the region
    subnet_id: str = ""  # with security_group_id: EFA interfaces in the placement group
    security_group_id: str = ""
    placement_group: str = ""
    worker_instance_profile: str = ""  # ARN of the stack's worker instance profile
    head_instance_profile: str = ""
    service_account: str = "coatnet"
    irsa_role_arn: str = ""
    mlflow_db: str = "postgres"  # "postgres" (in-cluster StatefulSet) or "external" (URI in a Secret)
    prefect_pool: str = "coatnet-process"  # the work pool of prefect.yaml
    checkpoint_retention_days: int = 14
    efa: bool = True  # use EFA where the instance type has it
    ray_version: str = field(default_factory=lambda: _ray_version())

    # --- derived numbers, the ones every file must agree on ---------------------------------------
    @property
    def instance(self) -> InstanceType:
        return get_instance(self.instance_type, kind="gpu")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def nvme_share_bytes(self) -> int:
        """The node-local NVMe that goes with this spec's GPUs (a pod with half the GPUs gets half the disks)."""
        return self.instance.nvme_bytes * self.gpus_per_node // self.instance.gpus

    @property
    def cache_limit_bytes(self) -> int:
        return int(self.nvme_share_bytes * self.cache_fraction)

    @property
    def cache_limit(self) -> str:
        """Streaming's ``cache_limit`` string (whole GiB, which streaming reads as binary units)."""
        return f"{self.cache_limit_bytes // GiB}gb"

    @property
    def launcher_efa(self) -> bool:
        """EFA on the launcher's GPU nodes: its network interfaces need the stack's subnet and security group."""
        return bool(self.efa and self.instance.efa_interfaces and self.subnet_id and self.security_group_id)

    @property
    def kubernetes_efa(self) -> bool:
        """EFA in the pods: requested from the EFA device plugin when the instance type has it."""
        return bool(self.instance.efa_interfaces) and self.efa

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.model}_in21k_{self.img_size}"

    @property
    def data_uri(self) -> str:
        return f"s3://{self.bucket}/{self.dataset}"

    @property
    def output_uri(self) -> str:
        # Under checkpoints/ so that the bucket's lifecycle rule for old checkpoint versions applies.
        return f"s3://{self.bucket}/checkpoints/{self.resolved_run_name}"

    @property
    def mlflow_artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/mlflow"

    @property
    def cluster_name(self) -> str:
        return self.name

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(world_size=self.world_size, grad_accum=self.grad_accum, cache_limit=self.cache_limit,
                 launcher_efa=self.launcher_efa, kubernetes_efa=self.kubernetes_efa, data_uri=self.data_uri,
                 output_uri=self.output_uri)
        return d


def _ray_version() -> str:
    try:
        import ray  # lazy and optional: rendering does not need Ray itself

        return ray.__version__
    except ImportError:  # rendering does not need Ray itself
        return "2.60.0"


def _suggest_batches(global_batch: int, micro: int, world: int) -> str:
    step = micro * world
    lower = (global_batch // step) * step
    options = [b for b in (lower, lower + step) if b > 0]
    micros = [m for m in sizing.divisors(max(global_batch // world, 1)) if global_batch % (m * world) == 0]
    parts = []
    if options:
        parts.append("global batch " + " or ".join(str(b) for b in options))
    if global_batch % world == 0 and micros:
        parts.append(f"micro-batch one of {', '.join(str(m) for m in micros)}")
    return "; ".join(parts)


def resolve(spec: ClusterSpec) -> ClusterSpec:
    """Validate ``spec`` and fill the training choices left open from the sizing estimate.

    Raises SpecError naming the field to change when the spec cannot work.
    """
    errors = []
    if not _NAME.match(spec.name):
        errors.append(f"name {spec.name!r} must be a DNS label (lower-case letters, digits, '-', at most 40)")
    if not _NAME.match(spec.namespace):
        errors.append(f"namespace {spec.namespace!r} must be a DNS label")
    if not _BUCKET.match(spec.bucket):
        errors.append(f"bucket {spec.bucket!r} is not a valid S3 bucket name")
    if spec.nodes < 1:
        errors.append(f"nodes must be at least 1, not {spec.nodes}")
    try:
        inst = get_instance(spec.instance_type, kind="gpu")
    except ValueError as e:
        raise SpecError(str(e)) from None
    for what, name in (("head", spec.head_instance_type), ("CPU worker", spec.cpu_instance_type)):
        try:
            get_instance(name)
        except ValueError as e:
            errors.append(f"{what} {e}")
    if spec.gpus_per_node < 1:
        errors.append(f"gpus-per-node must be at least 1, not {spec.gpus_per_node}")
    elif spec.gpus_per_node > inst.gpus:
        errors.append(
            f"gpus-per-node {spec.gpus_per_node} is more than {spec.instance_type} has ({inst.gpus} x {inst.gpu})"
        )
    models = sizing.known_models()
    if spec.model not in models:
        errors.append(f"unknown model {spec.model!r}; known: {', '.join(models)}")
    elif spec.model not in sizing.LAYOUTS:
        errors.append(f"model {spec.model!r} has no sizing layout; sizing knows {', '.join(sizing.LAYOUTS)}")
    if spec.zero_stage is not None and spec.zero_stage not in (0, 1, 2, 3):
        errors.append(f"zero-stage must be 0, 1, 2 or 3, not {spec.zero_stage}")
    if not 0 < spec.cache_fraction <= 0.95:
        errors.append(f"cache-fraction must be in (0, 0.95], not {spec.cache_fraction}")
    if spec.mlflow_db not in ("postgres", "external"):
        errors.append(f"mlflow-db must be 'postgres' or 'external', not {spec.mlflow_db!r}")
    if spec.img_size < 32 or spec.img_size % 32:
        errors.append(f"img-size must be a multiple of 32 (five stride-2 stages), not {spec.img_size}")
    if bool(spec.subnet_id) != bool(spec.security_group_id):
        errors.append("subnet-id and security-group-id go together (EFA interfaces need both)")
    if spec.cpu_workers_max < 0:
        errors.append(f"cpu-workers-max must be >= 0, not {spec.cpu_workers_max}")
    for item in spec.overrides:
        if "=" not in item or item.startswith("="):
            errors.append(f"override {item!r} must be KEY=VALUE")
    recipes = REPO_ROOT / "configs" / "pretrain"
    if recipes.is_dir() and not (REPO_ROOT / spec.config).is_file():
        # The image carries the repository's configs/; a recipe missing here is missing there too.
        known = ", ".join(sorted(f"configs/pretrain/{p.name}" for p in recipes.glob("*.yaml")))
        errors.append(f"config {spec.config!r} not found in the repository; recipes: {known}")
    if errors:
        raise SpecError("impossible cluster spec:\n  - " + "\n  - ".join(errors))

    world = spec.world_size
    if spec.global_batch < 1 or spec.global_batch % world:
        raise SpecError(
            f"global batch {spec.global_batch} is not divisible by the world size {world} "
            f"({spec.nodes} nodes x {spec.gpus_per_node} GPUs); choose a multiple of {world}"
        )
    if spec.micro_batch is not None and (spec.micro_batch < 1 or spec.global_batch % (spec.micro_batch * world)):
        raise SpecError(
            f"global batch {spec.global_batch} is not divisible by micro-batch {spec.micro_batch} x world size "
            f"{world} = {spec.micro_batch * world}, so gradient accumulation would not be whole; try "
            + _suggest_batches(spec.global_batch, spec.micro_batch or 1, world)
        )

    params, _, _ = sizing.count(spec.model, spec.img_size)
    if spec.zero_stage is not None:
        states = sizing.model_state_bytes(params, spec.zero_stage, world) / GiB
        if states > inst.gpu_memory_gib:
            raise SpecError(
                f"{spec.model} ({params / 1e9:.2f}B parameters) needs {states:.0f} GiB per GPU for weights, "
                f"gradients and optimizer state under ZeRO-{spec.zero_stage} on {world} GPUs, more than the "
                f"{inst.gpu_memory_gib:.0f} GiB of one {inst.gpu}; use a higher ZeRO stage or more GPUs"
            )

    plan = sizing.fit(spec.model, spec.img_size, instance_type=spec.instance_type, nodes=spec.nodes,
                      gpus_per_node=spec.gpus_per_node, global_batch=spec.global_batch)
    fill = {}
    if spec.zero_stage is None:
        if plan is None:
            raise SpecError(
                f"{spec.model} at {spec.img_size} does not fit the memory estimate on {world} x {inst.gpu}: "
                "add nodes, or set --zero-stage/--micro-batch yourself"
            )
        fill["zero_stage"] = plan.zero_stage
    if spec.activation_checkpointing is None:
        fill["activation_checkpointing"] = plan.checkpointing if plan else True
    if spec.micro_batch is None:
        zero = fill.get("zero_stage", spec.zero_stage)
        ckpt = fill.get("activation_checkpointing", spec.activation_checkpointing)
        fitting = [
            m for m in sizing.divisors(spec.global_batch // world)
            if sizing.memory_gib(spec.model, spec.img_size, params=params, zero_stage=zero, world_size=world,
                                 micro_batch=m, checkpointing=ckpt) <= inst.gpu_memory_gib * sizing.MEMORY_HEADROOM
        ]
        if not fitting:
            raise SpecError(
                f"{spec.model} at {spec.img_size} with ZeRO-{zero} does not fit one {inst.gpu} "
                f"({inst.gpu_memory_gib:.0f} GiB) even at micro-batch 1 by the memory estimate; use a higher ZeRO "
                "stage, --activation-checkpointing, or more GPUs"
            )
        fill["micro_batch"] = max(fitting)
    out = replace(spec, **fill)
    need = sizing.memory_gib(out.model, out.img_size, params=params, zero_stage=out.zero_stage, world_size=world,
                             micro_batch=out.micro_batch, checkpointing=out.activation_checkpointing)
    if need > inst.gpu_memory_gib:
        raise SpecError(
            f"micro-batch {out.micro_batch} of {out.model} at {out.img_size} needs about {need:.0f} GiB per GPU "
            f"(ZeRO-{out.zero_stage}, activation checkpointing {'on' if out.activation_checkpointing else 'off'}; "
            f"estimate from `coatnet cluster sizing`), more than the {inst.gpu_memory_gib:.0f} GiB of one "
            f"{inst.gpu}; lower --micro-batch, add --activation-checkpointing or raise --zero-stage"
        )
    return out
