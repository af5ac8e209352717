"""The pretraining recipe: frozen dataclasses loaded from a reviewed YAML file.

One YAML file per paper row (configs/pretrain/), big_vision style; a row's file ``extends:`` the
base of its family and states what differs. The sections are pydantic dataclasses: pydantic checks
types, ranges and unknown keys, and ``ConfigError`` reports each problem under its dotted key
(``optim.lr: ...``). ``load_config`` applies ``key.sub=value`` overrides (values parsed as YAML) and
checks what can be checked before any compute: batch splits (once the world size is known, see
``make_plan``) and that the shards exist.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from pipeline import models, storage
from pipeline.artifacts import SPLIT_INDEX, Manifest, ManifestNotFound, read_manifest, resolve_root
from pipeline.errors import UserError
from pipeline.train.known_datasets import KNOWN_DATASETS


class ConfigError(UserError, ValueError):
    """The config is invalid; the message names the offending key."""


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


# Strict where pydantic would otherwise coerce silently (true -> 1 for an integer, 1 or "yes" -> true for a
# boolean); floats stay lax so that integers and YAML 1.1's "1e-3" (read as a string) are accepted, booleans not.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Float = Annotated[float, BeforeValidator(_no_bool)]
Positive = Field(gt=0)
NonNegative = Field(ge=0)
Probability = Field(ge=0, le=1)
# Frozen, unknown keys rejected; still plain dataclasses (dataclasses.replace/asdict, positional arguments).
section = functools.partial(pydantic_dataclass, frozen=True, config=ConfigDict(extra="forbid"))


@section
class ModelConfig:
    name: Str = "coatnet_0"
    # None: the number of classes in the dataset manifest.
    num_classes: Annotated[Int, Positive] | None = None
    img_size: Annotated[Int, Field(ge=16)] = 224
    drop_path_rate: Annotated[Float, Field(ge=0, lt=1)] | None = None
    grad_checkpointing: Bool = False
    # A safetensors state dict (path or s3:// URI) loaded strictly before deepspeed.initialize.
    init_weights: Str | None = None
    # Extra keyword arguments for the model's constructor (architecture tweaks): coatnet.create_model's, or
    # timm.create_model's for a model.name of timm/<name> (pipeline.models).
    overrides: dict = field(default_factory=dict)
    # Regional torch.compile of each repeated block (engine.compile_choice). auto: on for CUDA with ZeRO 0-2,
    # off on CPU and under ZeRO-3 (its per-module gather hooks break the graphs).
    compile: Literal["auto"] | Bool = "auto"


@section
class DataConfig:
    # Dataset root written by pipeline.data (manifest.json + one MDS dataset per split).
    root: Str = ""
    train_split: Str = "train"
    eval_split: Literal["minival", "val"] = "minival"
    # Local shard cache; None: {output_dir}/cache. One sub-directory per split and run.
    cache_dir: Str | None = None
    cache_limit: Str | None = None
    num_workers: Annotated[Int, NonNegative] = 4
    prefetch_factor: Int = 2
    # Pinned so the global sample order does not depend on how many nodes/GPUs run the job. Streaming needs it
    # and the number of nodes to divide one another (check_canonical_nodes): a power of two N runs on 1..N nodes
    # in powers of two, and on any multiple of N.
    num_canonical_nodes: Annotated[Int, Field(ge=1)] = 1
    shuffle_algo: Str = "py1e"
    # None: the run's seed.
    shuffle_seed: Int | None = None
    predownload: Int | None = None
    # streaming's clean_stale_shared_memory() before starting: unlinks every streaming job's shared
    # memory on the node. Off by default: the trainer releases what a crashed run of its own left
    # (data.release_stale_shared_memory), which is all a restart needs and spares other jobs.
    clean_stale_shared_memory: Bool = False
    # Train samples for sizing a run whose shards cannot be read yet (dry run): a count, or a known dataset
    # (pipeline.train.known_datasets: imagenet1k, imagenet21k-fall11, imagenet21k-winter21). The shards'
    # own count wins whenever they can be read.
    num_samples: Annotated[Int, Positive] | Str | None = None



@section
class RandAugmentConfig:
    num_ops: Int = 2
    magnitude: Int = 9


@section
class AugmentConfig:
    crop_scale: tuple[Float, Float] = (0.08, 1.0)
    crop_ratio: tuple[Float, Float] = (0.75, 4.0 / 3.0)
    hflip: Annotated[Float, Probability] = 0.5
    randaugment: RandAugmentConfig | None = None
    mixup_alpha: Annotated[Float, NonNegative] = 0.0
    cutmix_alpha: Annotated[Float, NonNegative] = 0.0
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    mean: tuple[Float, Float, Float] = (0.485, 0.456, 0.406)
    std: tuple[Float, Float, Float] = (0.229, 0.224, 0.225)



@section
class EvalConfig:
    # 0: evaluate only at the end of training.
    interval_steps: Int = 0
    # Resize to img_size / crop_pct, then center-crop img_size (the paper's "center crop: yes");
    # center_crop false resizes straight to img_size (fine-tuning rows).
    center_crop: Bool = True
    crop_pct: Annotated[Float, Field(gt=0, le=1)] = 0.875
    batch_size: Annotated[Int, Positive] = 64
    # Cap on evaluated samples per evaluation (None: the whole split).
    max_samples: Int | None = None


@section
class LossConfig:
    type: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: Annotated[Float, Field(ge=0, lt=1)] = 0.0


@section
class OptimConfig:
    lr: Annotated[Float, Positive] = 1e-3
    min_lr: Float = 1e-5
    weight_decay: Annotated[Float, NonNegative] = 0.05
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = 1e-8
    # 0 disables clipping.
    grad_clip: Annotated[Float, NonNegative] = 1.0
    # The AdamW implementation (engine.optimizer_choice). auto: torch's fused AdamW on CUDA, torch's on CPU;
    # never a silent fallback: an explicit choice that cannot run fails at build.
    impl: Literal["auto", "deepspeed_fused", "torch_fused", "torch"] = "auto"



@section
class ScheduleConfig:
    type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Annotated[Int, NonNegative] = 0
    # Alternative to warmup_steps (the paper's 21K rows warm up for 5 epochs); not both.
    warmup_epochs: Annotated[Float, NonNegative] = 0.0



@section
class TrainRunConfig:
    epochs: Float = 1.0
    # Overrides epochs when set.
    max_steps: Annotated[Int, Positive] | None = None
    global_batch_size: Annotated[Int, Positive] = 4096
    # Per rank; None: global_batch_size / world_size (no accumulation).
    micro_batch_size: Annotated[Int, Positive] | None = None
    # Stop after this many optimizer steps of this invocation (testing interruption); None: run to the end.
    stop_after_steps: Int | None = None
    # Non-finite losses skipped (the micro-batch is dropped) before the run stops.
    max_nonfinite_skips: Annotated[Int, NonNegative] = 0
    # Write the sample keys each rank consumed per step to {output_dir}/samples/ (tests, audits).
    record_samples: Bool = False



@section
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Bool = False
    offload_params: Bool = False
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Raw DeepSpeed keys merged last (escape hatch, e.g. {"zero_optimization": {"reduce_bucket_size": ...}}).
    extra: dict = field(default_factory=dict)



@section
class EmaConfig:
    # None: no EMA. The paper uses 0.9999 in fine-tuning only.
    decay: Annotated[Float, Field(gt=0, lt=1)] | None = None
    every_steps: Annotated[Int, Field(ge=1)] = 1
    # Where the fp32 EMA copy lives: with the model (accelerator) or in host memory.
    device: Literal["model", "cpu"] = "model"


@section
class CheckpointConfig:
    # 0: only at the end.
    interval_steps: Annotated[Int, NonNegative] = 1000
    keep_last: Annotated[Int, Field(ge=1)] = 3
    # Optional object-storage copy (s3://... or a directory); downloaded on resume when the local one is missing.
    upload_uri: Str | None = None
    # Write model.safetensors / model_ema.safetensors / model_config.json at the end.
    export: Bool = True


@section
class LoggingConfig:
    interval_steps: Annotated[Int, Field(ge=1)] = 10
    mlflow: Bool = True
    mlflow_tracking_uri: Str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    mlflow_experiment: Str = "coatnet-pretrain"
    # Peak dense TFLOP/s of one device for the utilisation figure; None: known GPU table or none on CPU.
    peak_tflops: Float | None = None
    progress_bar: Bool = True


@section
class TrainConfig:
    name: Str = "coatnet"
    output_dir: Str = "runs/coatnet"
    seed: Int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainRunConfig = field(default_factory=TrainRunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def config_hash(self) -> str:
        """Hash of everything that changes the training trajectory (not paths, logging, cadence)."""
        d = self.to_dict()
        for key in _HASH_EXCLUDED:
            section, _, leaf = key.partition(".")
            if leaf:
                d[section].pop(leaf, None)
            else:
                d.pop(section, None)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> TrainConfig:
        try:
            return dataclasses.replace(self, **changes)
        except ValidationError as e:
            raise config_error(e, TrainConfig) from None


# Keys that may change between a run and its resumption without changing the weights it reaches.
_HASH_EXCLUDED = (
    "name", "output_dir", "logging", "checkpoint",
    "data.root", "data.cache_dir", "data.cache_limit", "data.num_workers", "data.prefetch_factor",
    "data.predownload", "data.clean_stale_shared_memory", "data.num_samples", "eval",
    "train.stop_after_steps", "train.record_samples", "ema.device",
)


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# pydantic's errors as one ConfigError naming each dotted key.

def _section_class(root: type, path: list[str]) -> type | None:
    """The dataclass at a dotted path below ``root`` (``["augment", "randaugment"]``), if it is one."""
    cls: Any = root
    for name in path:
        hint = typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
        cls = hint
    return cls if dataclasses.is_dataclass(cls) else None


def _is_union_member(part: str) -> bool:
    # pydantic names the member of a union that failed ("int", "str", "literal['a']", a class name) in the
    # location; config keys are lower-case identifiers.
    return part in ("int", "str", "float", "bool", "none") or not part.isidentifier() or part[0].isupper()


def config_error(error: ValidationError, root: type, prefix: str = "") -> ConfigError:
    """pydantic's ``ValidationError`` for ``root`` as a ConfigError with one ``key: problem`` per key."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for e in error.errors():
        path = [p for p in e["loc"] if isinstance(p, int) or not _is_union_member(p)]
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            names = [p for p in path if isinstance(p, str)]
            cls = _section_class(root, names[:-1])
            known = ", ".join(f.name for f in dataclasses.fields(cls)) if cls else "?"
            where = ".".join(filter(None, [prefix, *names[:-1]]))
            problems.setdefault(f"unknown key '{'.'.join(filter(None, [prefix, *names]))}' "
                                f"(known keys{' of ' + where if where else ''}: {known})", [])
            continue
        elif e["type"] == "missing" and path and isinstance(path[-1], int):  # a list shorter than its tuple
            path, message = path[:-1], "too few values"
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        key = ".".join(filter(None, [prefix, key])) or "<top level>"
        problems.setdefault(key, []).append(message[:1].lower() + message[1:])
        if e["type"] not in ("missing", "value_error") or message == "too few values":
            inputs.setdefault(key, e["input"])
    return ConfigError("; ".join(
        f"{k}: {' or '.join(m)}" + (f", got {inputs[k]!r}" if k in inputs else "") if m else k
        for k, m in problems.items()))


_TRAIN_CONFIG = TypeAdapter(TrainConfig)


def from_dict(data: dict) -> TrainConfig:
    """A validated TrainConfig from plain data (a recipe's mapping after overrides)."""
    try:
        cfg = _TRAIN_CONFIG.validate_python(data)
    except ValidationError as e:
        raise config_error(e, TrainConfig) from None
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks across keys (pydantic has checked each key on its own)."""
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    t, o, s, d, n = cfg.train, cfg.optim, cfg.schedule, cfg.deepspeed, cfg.data.num_samples
    need(bool(cfg.data.root), "data.root", "the dataset root is required")
    need(t.micro_batch_size is None or t.global_batch_size % t.micro_batch_size == 0,
         "train.global_batch_size", f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    need(t.epochs > 0 or t.max_steps is not None, "train.epochs", "must be positive (or set train.max_steps)")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"{o.min_lr:g} must be in [0, optim.lr={o.lr:g}]")
    need(not (s.warmup_steps and s.warmup_epochs), "schedule.warmup_steps",
         "set warmup_steps or warmup_epochs, not both")
    need(0 < cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[1] <= 1, "augment.crop_scale",
         f"{list(cfg.augment.crop_scale)} must satisfy 0 < lo <= hi <= 1")
    need(not d.offload_params or d.zero_stage == 3, "deepspeed.offload_params",
         "parameter offload needs deepspeed.zero_stage=3")
    need(not d.offload_optimizer or d.zero_stage >= 1, "deepspeed.offload_optimizer",
         "optimizer offload needs deepspeed.zero_stage >= 1")
    need(not isinstance(n, str) or n in KNOWN_DATASETS, "data.num_samples",
         f"{n!r} is neither a sample count nor a known dataset ({', '.join(KNOWN_DATASETS)})")
    _check_model_name(cfg.model)


def _check_model_name(m: ModelConfig) -> None:
    """``model.name`` builds (a CoAtNet variant, or ``timm/<name>`` of a model timm knows), and the overrides
    leave the keys the model section sets to it."""
    try:
        models.check_name(m.name)
    except models.ModelNameError as e:
        raise ConfigError(f"model.name: {e}") from None
    reserved = sorted(set(m.overrides) & set(models.RESERVED_OVERRIDES))
    if reserved:
        raise ConfigError(f"model.overrides: {', '.join(reserved)} set by the model section itself (model.<key>; "
                          "pretrained weights: model.init_weights), not by overrides")


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``a.b=value`` with value parsed as YAML (``x=null``, ``y=[1,2]``, ``z=1e-3``)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            sub = node.get(p)
            if sub is None:
                sub = node[p] = {}
            elif not isinstance(sub, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is not a section")
            node = sub
        node[parts[-1]] = value
    return data


# ---------------------------------------------------------------------------------------------
# Recipe files: a row's file names the base it extends and states only what differs.

EXTENDS = "extends"


def read_recipe(path: str | Path, *, file_relative: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe file's top-level mapping, its ``extends:`` chain merged in; or a ConfigError naming the file.

    ``extends: FILE`` (relative to the file that says it) names a base recipe: the file's own keys win,
    mappings merge key by key, anything else (lists, scalars, null) replaces the base's value. The dotted
    keys in ``file_relative`` hold paths that are likewise relative to the file that sets them.
    """
    return _read_chain(Path(path), file_relative, ())


def _read_chain(path: Path, file_relative: tuple[str, ...], seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: '{EXTENDS}' loops back to a file that extends it")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key in file_relative:  # made relative to the working directory, as every other path of a recipe
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            node[leaf] = os.path.normpath(path.parent / value)
    base = data.pop(EXTENDS, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {EXTENDS}: expected the path of a base recipe, got {base!r}")
    return _merge(_read_chain(path.parent / base, file_relative, (*seen, path.resolve())), data)


def _merge(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in own.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_data: bool = True) -> TrainConfig:
    """Load, override and validate a recipe. ``check_data`` also checks the shards exist."""
    cfg = from_dict(apply_overrides(read_recipe(path), list(overrides)))
    if check_data:
        check_shards(cfg)
    return cfg


@functools.lru_cache(maxsize=64)
def dataset_root(root: str) -> str:
    """The dataset root: ``root`` itself, or the one its ``LATEST`` pointer names (sharding output dir)."""
    try:
        return resolve_root(root)
    except FileNotFoundError as e:
        raise ConfigError(f"data.root: {e}; run `coatnet shard` first or fix data.root") from e
    except Exception as e:  # noqa: BLE001 - bucket, credentials, endpoint: one actionable message
        raise ConfigError(f"data.root: cannot read {root} ({type(e).__name__}: {e})") from e


def split_uri(cfg: TrainConfig, split: str) -> str:
    return storage.join(dataset_root(cfg.data.root), split)


def split_samples(cfg: TrainConfig, split: str) -> int:
    """Samples in a split, from its MDS index (the file streaming itself reads)."""
    index_uri = storage.join(split_uri(cfg, split), SPLIT_INDEX)
    try:
        index = json.loads(storage.read_text(index_uri))
    except Exception as e:  # noqa: BLE001 - missing file, bucket or credentials: one actionable message
        raise ConfigError(
            f"data.root: no shards for split '{split}' at {index_uri} ({type(e).__name__}: {e}); "
            "run `coatnet shard` first or fix data.root / data.train_split / data.eval_split"
        ) from e
    return sum(int(s["samples"]) for s in index["shards"])


def dataset_manifest(cfg: TrainConfig) -> Manifest:
    """The manifest of ``data.root``; a ``ConfigError`` naming ``data.root`` when it cannot be read."""
    try:
        return read_manifest(dataset_root(cfg.data.root))
    except ManifestNotFound as e:
        raise ConfigError(f"data.root: {e}") from e


def node_count_problem(num_canonical_nodes: int, world_size: int, ranks_per_node: int) -> str | None:
    """Why streaming cannot partition the samples over ``world_size`` ranks, ``ranks_per_node`` on each node
    (None when it can).

    Streaming's partition (``streaming/base/partition/orig.py``; ``relaxed.py`` calls it for a first start and
    whenever the counts divide) needs the canonical and the physical nodes to divide one another; its physical
    nodes are ``WORLD_SIZE // LOCAL_WORLD_SIZE`` (``streaming/base/world.py``), every node with the same number of
    ranks. ``relaxed`` would accept other node counts on a resume, but re-deals the first run's partition assuming
    the same ranks per node; the trainer holds every run to the divisibility, which keeps the sample order the
    canonical one on any world size.
    """
    if ranks_per_node < 1 or world_size % ranks_per_node:
        return (f"{world_size} ranks do not spread evenly over nodes of {ranks_per_node} ranks (streaming needs "
                f"the same number of ranks on every node)")
    nodes = world_size // ranks_per_node
    if max(nodes, num_canonical_nodes) % min(nodes, num_canonical_nodes):
        return (f"{num_canonical_nodes} and the {nodes} nodes ({world_size} ranks, {ranks_per_node} per node) do not "
                f"divide one another, which streaming requires; choose a data.num_canonical_nodes that the node "
                f"count divides or is a multiple of (a power of two such as 64 covers 1..64 nodes in powers of two)")
    return None


def check_canonical_nodes(cfg: TrainConfig, world_size: int, ranks_per_node: int) -> None:
    """Raise ConfigError naming ``data.num_canonical_nodes`` when streaming cannot use this world."""
    problem = node_count_problem(cfg.data.num_canonical_nodes, world_size, ranks_per_node)
    if problem:
        raise ConfigError(f"data.num_canonical_nodes: {problem}")


def check_shards(cfg: TrainConfig) -> None:
    split_samples(cfg, cfg.data.train_split)
    split_samples(cfg, cfg.data.eval_split)


# ---------------------------------------------------------------------------------------------
# The resolved plan: what the config means for a given world size.

@dataclass(frozen=True)
class Plan:
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    train_samples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    num_classes: int
    params: int | None = None
    macs_per_image: int | None = None

    @property
    def train_flops_per_image(self) -> float | None:
        # forward = 2 FLOPs per MAC; backward ~ twice the forward.
        return None if self.macs_per_image is None else 6.0 * self.macs_per_image

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def batch_split(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) so that micro * accum * world == global batch."""
    gb = cfg.train.global_batch_size
    mb = cfg.train.micro_batch_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if mb is None:
        if gb % world_size:
            raise ConfigError(f"train.global_batch_size: {gb} cannot be split evenly over {world_size} ranks")
        return gb // world_size, 1
    if gb % (mb * world_size):
        raise ConfigError(
            f"train.global_batch_size: {gb} is not a multiple of train.micro_batch_size ({mb}) x world size "
            f"({world_size}) = {mb * world_size}; change one of them"
        )
    return mb, gb // (mb * world_size)


def make_plan(cfg: TrainConfig, world_size: int, *, with_counts: bool = True,
              train_samples: int | None = None, num_classes: int | None = None) -> Plan:
    micro, accum = batch_split(cfg, world_size)
    if train_samples is None:
        train_samples = split_samples(cfg, cfg.data.train_split)
    steps_per_epoch = train_samples // cfg.train.global_batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.global_batch_size: {cfg.train.global_batch_size} exceeds the {train_samples} samples of split "
            f"'{cfg.data.train_split}'"
        )
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.schedule.warmup_steps or round(cfg.schedule.warmup_epochs * steps_per_epoch)
    if warmup > total:
        raise ConfigError(f"schedule.warmup_steps: {warmup} warm-up steps exceed the {total} training steps")
    if num_classes is None:
        num_classes = cfg.model.num_classes or dataset_manifest(cfg).num_classes
    params = macs = None
    if with_counts:
        params, macs = model_counts(cfg, num_classes)
    return Plan(world_size, micro, accum, cfg.train.global_batch_size, train_samples, steps_per_epoch, total,
                warmup, num_classes, params, macs)


def model_counts(cfg: TrainConfig, num_classes: int) -> tuple[int | None, int | None]:
    """(parameters, MACs per image) of the recipe's model, counted without allocating it (pipeline.models)."""
    m = cfg.model
    return models.count(m.name, num_classes=num_classes, img_size=m.img_size, overrides=m.overrides)
