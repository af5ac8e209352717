"""Pretraining with DeepSpeed ZeRO from streamed MDS shards.

    from pipeline.train import launch, load_config
    result = launch("configs/pretrain/demo.yaml", ["train.epochs=2"], launcher="local", nproc=2)

``run(config)`` is one rank inside a process group; ``launch`` starts the ranks and waits.
Attributes are imported lazily so that reading a config does not import DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "pipeline.train.config",
    "ConfigError": "pipeline.train.config",
    "Plan": "pipeline.train.config",
    "load_config": "pipeline.train.config",
    "make_plan": "pipeline.train.config",
    "run": "pipeline.train.trainer",
    "TrainResult": "pipeline.artifacts",
    "NonFiniteLossError": "pipeline.train.trainer",
    "launch": "pipeline.train.launcher",
    "RayOptions": "pipeline.train.launcher",
    "LaunchError": "pipeline.train.launcher",
    "ResumeError": "pipeline.train.checkpoint",
    "consolidate": "pipeline.train.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        # lazy by design (docstring): importing one submodule (config) loads no trainer
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.train' has no attribute {name!r}")
