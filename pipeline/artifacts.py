"""The contract between stages: every file one stage writes and a later stage (or another tool) reads.

Two kinds of directory, each a local path or an ``s3://`` URI (read and written through
``pipeline.storage``):

* a dataset root, written by ``pipeline.data`` (sharding): ``manifest.json`` (``Manifest``) and one MDS
  dataset per split (``{split}/index.json``); the sharding output dir names its newest root in ``LATEST``;
* a run directory (``RunDir``), written by the trainer, the fine-tuning stage and evaluation::

    config.yaml               the resolved recipe the launcher hands every rank
    plan.json                 the trainer's plan (batch split, steps, classes)
    result.json               rank 0's TrainResult, read back by the launcher, the flows and lineage
    metrics.jsonl             one JSON object per logged step
    training_curve.png        the loss curve
    model.safetensors         exported fp32 weights
    model_ema.safetensors     exported EMA weights (when the recipe keeps an EMA)
    model_config.json         what rebuilds the model (name, classes, coatnet config, mean/std)
    preprocessing.json        the evaluation transform (fine-tuning stage)
    finetune.json             the fine-tuning record: init report, lineage ids, data manifest hash
    finetune/init.safetensors the prepared initial weights (+ init.json, their fingerprint)
    checkpoints/              DeepSpeed checkpoints (layout: pipeline.train.checkpoint)
    logs/rank{N}.log          each local rank's output
    eval/{split}/evaluation.json  an EvaluationReport (+ predictions and plots)

The JSON formats are unchanged from before these types: a model keeps keys it does not know
(pydantic ``extra="allow"``, or ``TrainResult.extra``) and writes them back, so older and newer
files load and other tools keep reading them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline import storage
from pipeline.errors import UserError

# --------------------------------------------------------------------------------------------- dataset root
MANIFEST = "manifest.json"
DATASET_LATEST = "LATEST"
SPLIT_INDEX = "index.json"


class ManifestNotFound(UserError, FileNotFoundError):
    """No finished dataset at the given location, or its manifest cannot be read."""


def resolve_root(uri: str) -> str:
    """The dataset root for ``uri``: itself if it holds a manifest, else the root ``uri/LATEST`` names."""
    if storage.exists(storage.join(uri, MANIFEST)):
        return uri
    pointer = storage.join(uri, DATASET_LATEST)
    if storage.exists(pointer):
        return storage.join(uri, storage.read_text(pointer).strip())
    raise ManifestNotFound(f"no {MANIFEST} at {uri} (nor a {DATASET_LATEST} pointer): is the sharding job "
                           "finished? (`coatnet shard` writes it last)")


def load_manifest(uri: str) -> dict:
    """The manifest of the dataset at ``uri`` (a dataset root, or the ``out`` given to ``shard_dataset``) as
    the dict on disk, plus ``root``: the resolved root."""
    root = resolve_root(uri)
    manifest = json.loads(storage.read_text(storage.join(root, MANIFEST)))
    manifest.setdefault("root", root)
    return manifest


def read_manifest(uri: str) -> Manifest:
    """``load_manifest`` typed; any failure to read it (no manifest, a missing bucket, no credentials) is a
    ``ManifestNotFound`` that names ``uri``."""
    try:
        return Manifest.model_validate(load_manifest(uri))
    except ManifestNotFound:
        raise
    except Exception as e:  # noqa: BLE001 - missing file, bucket or credentials: one actionable message
        raise ManifestNotFound(f"{uri}: cannot read the dataset manifest ({type(e).__name__}: {e})") from e


class _Record(BaseModel):
    """A JSON record: unknown keys are kept (and written back), nothing is coerced silently."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order they were read (declared ones first for a new record)."""
        return self.model_dump(exclude_unset=True)


class SplitInfo(_Record):
    """``manifest["splits"][split]``: what the split's MDS index holds."""

    samples: int = 0
    class_counts: list[int] = Field(default_factory=list)
    masked: list[int] = Field(default_factory=list)  # sample indices of duplicates found after writing


class Manifest(_Record):
    """``manifest.json`` of a dataset root (keys: docs/architecture.md, pipeline/data/manifest.py)."""

    root: str | None = None  # added when read: the resolved dataset root
    source: str | None = None
    num_classes: int
    classes: list[str] = Field(default_factory=list)
    splits: dict[str, SplitInfo] = Field(default_factory=dict)
    manifest_hash: str | None = None
    config_hash: str | None = None
    parent_classes: list[str] | None = None
    parent_map: list[int] | None = None

    def split(self, name: str) -> SplitInfo:
        """The split's record; an empty one (no samples) when the dataset has no such split."""
        return self.splits.get(name) or SplitInfo()

    def samples(self, split: str) -> int:
        """Samples in the split's index (what streaming yields, masked duplicates included)."""
        return self.split(split).samples

    def masked(self, split: str) -> list[int]:
        return self.split(split).masked


# --------------------------------------------------------------------------------------------- run directory
@dataclass(frozen=True)
class RunDir:
    """A training or fine-tuning run directory (local path or ``s3://`` URI): its file names and read/write
    helpers. The names are class attributes so that code that only needs a name does not build one."""

    uri: str

    CONFIG = "config.yaml"
    PLAN = "plan.json"
    RESULT = "result.json"
    METRICS = "metrics.jsonl"
    CURVE = "training_curve.png"
    WEIGHTS = "model.safetensors"
    EMA_WEIGHTS = "model_ema.safetensors"
    MODEL_CONFIG = "model_config.json"
    PREPROCESSING = "preprocessing.json"
    FINETUNE_RECORD = "finetune.json"
    FINETUNE_DIR = "finetune"
    INIT_WEIGHTS = "init.safetensors"
    INIT_META = "init.json"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"
    EVAL = "eval"
    EVALUATION = "evaluation.json"
    NONFINITE = "nonfinite"
    SAMPLES = "samples"
    CACHE = "cache"
    # Which weights file each evaluated kind reads.
    WEIGHT_FILES = {"raw": WEIGHTS, "ema": EMA_WEIGHTS}

    def __post_init__(self) -> None:
        object.__setattr__(self, "uri", str(self.uri))

    @property
    def is_remote(self) -> bool:
        return storage.is_remote(self.uri)

    @property
    def path(self) -> Path:
        """The local directory (a remote run directory has none)."""
        if self.is_remote:
            raise ValueError(f"{self.uri} is not a local directory")
        return Path(self.uri)

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def local(self, *parts: str) -> Path:
        return Path(self.path, *parts)

    def exists(self, *parts: str) -> bool:
        return storage.exists(self.join(*parts))

    def read_text(self, *parts: str) -> str:
        return storage.read_text(self.join(*parts))

    def write_text(self, name: str, text: str) -> str:
        uri = self.join(name)
        storage.write_text(uri, text)
        return uri

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_text(*parts))

    def write_json(self, name: str, obj: Any, *, default: Any = None) -> str:
        return self.write_text(name, json.dumps(obj, indent=2, default=default))

    def fetch(self, name: str, into: Path) -> Path | None:
        """A local copy of ``name`` (the file itself when local, else downloaded into ``into``); None if absent."""
        src = self.join(name)
        if not storage.exists(src):
            return None
        if not self.is_remote:
            return Path(src)
        return storage.download_file(src, into / name)

    # -- named places --------------------------------------------------------------------------
    @property
    def checkpoints(self) -> str:
        return self.join(self.CHECKPOINTS)

    @property
    def logs(self) -> str:
        return self.join(self.LOGS)

    def rank_log(self, rank: int) -> Path:
        return self.local(self.LOGS, f"rank{rank}.log")

    @property
    def finetune_dir(self) -> str:
        return self.join(self.FINETUNE_DIR)

    def eval_dir(self, split: str) -> str:
        return self.join(self.EVAL, split)

    def evaluation(self, split: str = "val") -> str:
        return self.join(self.EVAL, split, self.EVALUATION)

    def weights(self, kind: str = "raw") -> str:
        return self.join(self.WEIGHT_FILES[kind])

    # -- records -------------------------------------------------------------------------------
    def read_result(self) -> TrainResult:
        return TrainResult.from_dict(self.read_json(self.RESULT))

    def write_result(self, result: TrainResult) -> str:
        return self.write_json(self.RESULT, result.to_dict())

    def read_finetune_record(self) -> dict[str, Any] | None:
        return self.read_json(self.FINETUNE_RECORD) if self.exists(self.FINETUNE_RECORD) else None


@dataclass(frozen=True)
class TrainResult:
    """``result.json``: what a training run reached and where its outputs are. (A dataclass, not a pydantic
    model: pydantic reserves the name of the ``model_config`` field.)"""

    output_dir: str
    checkpoint_dir: str
    last_checkpoint: str | None
    step: int
    epoch: int
    total_steps: int
    finished: bool
    config_hash: str
    final_metrics: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    weights: str | None = None
    ema_weights: str | None = None
    model_config: str | None = None
    curve_png: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer writer added: kept, written back

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    @classmethod
    def read(cls, output_dir: str | Path) -> TrainResult:
        return RunDir(str(output_dir)).read_result()


class EvaluationReport(_Record):
    """``eval/{split}/evaluation.json``: per weights (``raw``/``ema`` or ``registry``) the metrics, and which
    scored best."""

    # Declared in the order evaluate writes them, which model_dump keeps.
    model: str
    data: str | None = None
    split: str
    manifest_hash: str | None = None
    num_classes: int | None = None
    preprocessing: dict[str, Any] | None = None
    batch_size: int | None = None
    device: str | None = None
    torch_threads: int | None = None
    created: str | None = None
    weights: dict[str, dict[str, Any]]
    best: str
    out_dir: str | None = None
    mlflow_run_id: str | None = None

    @property
    def best_metrics(self) -> dict[str, Any]:
        return self.weights[self.best]

    @classmethod
    def read(cls, path_or_dir: str | Path) -> EvaluationReport:
        """From ``evaluation.json`` or the directory holding it (local or ``s3://``)."""
        uri = str(path_or_dir)
        if Path(uri).is_dir() if not storage.is_remote(uri) else not uri.endswith(".json"):
            uri = storage.join(uri, RunDir.EVALUATION)
        return cls.model_validate(json.loads(storage.read_text(uri)))

    def write(self, out_dir: str | Path) -> str:
        uri = storage.join(str(out_dir), RunDir.EVALUATION)
        storage.write_text(uri, json.dumps(self.to_dict(), indent=2))
        return uri
