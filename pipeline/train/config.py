"""The pretraining recipe: frozen dataclasses loaded from a reviewed YAML file.

One YAML file per paper row (configs/pretrain/), big_vision style. ``load_config`` rejects
unknown keys and wrong types naming the dotted key, applies ``key.sub=value`` overrides
(values parsed as YAML), and checks what can be checked before any compute: batch splits
(once the world size is known, see ``plan``) and that the shards exist.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """The config is invalid; the message names the offending key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "coatnet_0"
    # None: the number of classes in the dataset manifest.
    num_classes: int | None = None
    img_size: int = 224
    drop_path_rate: float | None = None
    grad_checkpointing: bool = False
    # A safetensors state dict (path or s3:// URI) loaded strictly before deepspeed.initialize.
    init_weights: str | None = None
    # Extra keyword arguments for coatnet.create_model (architecture tweaks).
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    # Dataset root written by pipeline.data (manifest.json + one MDS dataset per split).
    root: str = ""
    train_split: str = "train"
    eval_split: Literal["minival", "val"] = "minival"
    # Local shard cache; None: {output_dir}/cache. One sub-directory per split and run.
    cache_dir: str | None = None
    cache_limit: str | None = None
    num_workers: int = 4
    prefetch_factor: int = 2
    # Pinned so the global sample order does not depend on how many nodes/GPUs run the job.
    num_canonical_nodes: int = 1
    shuffle_algo: str = "py1e"
    # None: the run's seed.
    shuffle_seed: int | None = None
    predownload: int | None = None
    # streaming's clean_stale_shared_memory() before starting: unlinks every streaming job's shared
    # memory on the node. Off by default: the trainer releases what a crashed run of its own left
    # (data.release_stale_shared_memory), which is all a restart needs and spares other jobs.
    clean_stale_shared_memory: bool = False


@dataclass(frozen=True)
class RandAugmentConfig:
    num_ops: int = 2
    magnitude: int = 9


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    randaugment: RandAugmentConfig | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalConfig:
    # 0: evaluate only at the end of training.
    interval_steps: int = 0
    # Resize to img_size / crop_pct, then center-crop img_size (the paper's "center crop: yes");
    # center_crop false resizes straight to img_size (fine-tuning rows).
    center_crop: bool = True
    crop_pct: float = 0.875
    batch_size: int = 64
    # Cap on evaluated samples per evaluation (None: the whole split).
    max_samples: int | None = None


@dataclass(frozen=True)
class LossConfig:
    type: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # Alternative to warmup_steps (the paper's 21K rows warm up for 5 epochs); not both.
    warmup_epochs: float = 0.0


@dataclass(frozen=True)
class TrainRunConfig:
    epochs: float = 1.0
    # Overrides epochs when set.
    max_steps: int | None = None
    global_batch_size: int = 4096
    # Per rank; None: global_batch_size / world_size (no accumulation).
    micro_batch_size: int | None = None
    # Stop after this many optimizer steps of this invocation (testing interruption); None: run to the end.
    stop_after_steps: int | None = None
    # Non-finite losses skipped (the micro-batch is dropped) before the run stops.
    max_nonfinite_skips: int = 0
    # Write the sample keys each rank consumed per step to {output_dir}/samples/ (tests, audits).
    record_samples: bool = False


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Raw DeepSpeed keys merged last (escape hatch, e.g. {"zero_optimization": {"reduce_bucket_size": ...}}).
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EmaConfig:
    # None: no EMA. The paper uses 0.9999 in fine-tuning only.
    decay: float | None = None
    every_steps: int = 1
    # Where the fp32 EMA copy lives: with the model (accelerator) or in host memory.
    device: Literal["model", "cpu"] = "model"


@dataclass(frozen=True)
class CheckpointConfig:
    interval_steps: int = 1000
    keep_last: int = 3
    # Optional object-storage copy (s3://... or a directory); downloaded on resume when the local one is missing.
    upload_uri: str | None = None
    # Write model.safetensors / model_ema.safetensors / model_config.json at the end.
    export: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    interval_steps: int = 10
    mlflow: bool = True
    mlflow_tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    mlflow_experiment: str = "coatnet-pretrain"
    # Peak dense TFLOP/s of one device for the utilisation figure; None: known GPU table or none on CPU.
    peak_tflops: float | None = None
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    name: str = "coatnet"
    output_dir: str = "runs/coatnet"
    seed: int = 0
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
        return dataclasses.replace(self, **changes)


# Keys that may change between a run and its resumption without changing the weights it reaches.
_HASH_EXCLUDED = (
    "name", "output_dir", "logging", "checkpoint",
    "data.root", "data.cache_dir", "data.cache_limit", "data.num_workers", "data.prefetch_factor",
    "data.predownload", "data.clean_stale_shared_memory", "eval", "train.stop_after_steps", "train.record_samples", "ema.device",
)


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts with key and type checks.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string.
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a schema bug, not a user error


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in hints:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown key '{where}' (known keys{' of ' + prefix if prefix else ''}: {', '.join(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict) -> TrainConfig:
    cfg = _build(TrainConfig, data)
    validate(cfg)
    return cfg


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


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file's top-level mapping, or a ConfigError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_data: bool = True) -> TrainConfig:
    """Load, override and validate a recipe. ``check_data`` also checks the shards exist."""
    cfg = from_dict(apply_overrides(read_recipe(path), list(overrides)))
    if check_data:
        check_shards(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no world size and no data."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(bool(cfg.data.root), "data.root", "the dataset root is required")
    need(cfg.model.img_size >= 16, "model.img_size", "must be >= 16")
    need(cfg.model.num_classes is None or cfg.model.num_classes > 0, "model.num_classes", "must be positive")
    need(cfg.model.drop_path_rate is None or 0 <= cfg.model.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
    need(cfg.train.global_batch_size > 0, "train.global_batch_size", "must be positive")
    mb = cfg.train.micro_batch_size
    need(mb is None or mb > 0, "train.micro_batch_size", "must be positive")
    need(mb is None or cfg.train.global_batch_size % mb == 0, "train.global_batch_size",
         f"{cfg.train.global_batch_size} is not a multiple of train.micro_batch_size={mb}")
    need(cfg.train.epochs > 0 or cfg.train.max_steps is not None, "train.epochs", "must be positive (or set train.max_steps)")
    need(cfg.train.max_steps is None or cfg.train.max_steps > 0, "train.max_steps", "must be positive")
    need(cfg.train.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", "must be >= 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    need(0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr", "must be in [0, optim.lr]")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(not (cfg.schedule.warmup_steps and cfg.schedule.warmup_epochs), "schedule.warmup_steps",
         "set warmup_steps or warmup_epochs, not both")
    need(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    need(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
    need(0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
    need(0 < cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[1] <= 1, "augment.crop_scale", "must satisfy 0 < lo <= hi <= 1")
    need(0 <= cfg.augment.hflip <= 1, "augment.hflip", "must be a probability")
    need(cfg.augment.mixup_alpha >= 0 and cfg.augment.cutmix_alpha >= 0, "augment.mixup_alpha", "alphas must be >= 0")
    need(0 < cfg.eval.crop_pct <= 1, "eval.crop_pct", "must be in (0, 1]")
    need(cfg.eval.batch_size > 0, "eval.batch_size", "must be positive")
    need(cfg.ema.decay is None or 0 < cfg.ema.decay < 1, "ema.decay", "must be in (0, 1)")
    need(cfg.ema.every_steps >= 1, "ema.every_steps", "must be >= 1")
    need(cfg.checkpoint.interval_steps >= 0, "checkpoint.interval_steps", "must be >= 0 (0: only at the end)")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.logging.interval_steps >= 1, "logging.interval_steps", "must be >= 1")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(cfg.data.num_canonical_nodes >= 1, "data.num_canonical_nodes", "must be >= 1")
    need(not cfg.deepspeed.offload_params or cfg.deepspeed.zero_stage == 3, "deepspeed.offload_params",
         "parameter offload needs deepspeed.zero_stage=3")
    need(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage >= 1, "deepspeed.offload_optimizer",
         "optimizer offload needs deepspeed.zero_stage >= 1")


@functools.lru_cache(maxsize=64)
def dataset_root(root: str) -> str:
    """The dataset root: ``root`` itself, or the one its ``LATEST`` pointer names (sharding output dir)."""
    from pipeline.data.manifest import resolve_root

    try:
        return resolve_root(root)
    except FileNotFoundError as e:
        raise ConfigError(f"data.root: {e}; run `coatnet shard` first or fix data.root") from e
    except Exception as e:  # noqa: BLE001 - bucket, credentials, endpoint: one actionable message
        raise ConfigError(f"data.root: cannot read {root} ({type(e).__name__}: {e})") from e


def split_uri(cfg: TrainConfig, split: str) -> str:
    from pipeline import storage

    return storage.join(dataset_root(cfg.data.root), split)


def split_samples(cfg: TrainConfig, split: str) -> int:
    """Samples in a split, from its MDS index (the file streaming itself reads)."""
    from pipeline import storage

    index_uri = storage.join(split_uri(cfg, split), "index.json")
    try:
        index = json.loads(storage.read_text(index_uri))
    except Exception as e:  # noqa: BLE001 - missing file, bucket or credentials: one actionable message
        raise ConfigError(
            f"data.root: no shards for split '{split}' at {index_uri} ({type(e).__name__}: {e}); "
            "run `coatnet shard` first or fix data.root / data.train_split / data.eval_split"
        ) from e
    return sum(int(s["samples"]) for s in index["shards"])


def read_manifest(cfg: TrainConfig) -> dict:
    from pipeline import storage

    uri = storage.join(dataset_root(cfg.data.root), "manifest.json")
    try:
        return json.loads(storage.read_text(uri))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"data.root: cannot read {uri} ({type(e).__name__}: {e})") from e


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
        num_classes = cfg.model.num_classes or int(read_manifest(cfg)["num_classes"])
    params = macs = None
    if with_counts:
        params, macs = model_counts(cfg, num_classes)
    return Plan(world_size, micro, accum, cfg.train.global_batch_size, train_samples, steps_per_epoch, total,
                warmup, num_classes, params, macs)


def model_counts(cfg: TrainConfig, num_classes: int) -> tuple[int | None, int | None]:
    """(parameters, MACs per image) from the model package's analytic counter."""
    try:
        import coatnet

        conf = coatnet.get_config(cfg.model.name)
        if cfg.model.overrides:
            conf = conf.replace(**cfg.model.overrides)
        p, m = coatnet.count(conf, cfg.model.img_size, num_classes=num_classes)
        return int(p), int(m)
    except (ImportError, AttributeError):  # the model package without its counter
        return None, None
