"""Fine-tuning a 21K-pretrained CoAtNet on 1K classes at a higher resolution, through the same trainer.

    from pipeline.finetune import run
    result = run("configs/finetune/demo.yaml", launcher="local", nproc=2)
"""

from pipeline.finetune.config import FinetuneConfig, FinetuneSection, load_finetune_config
from pipeline.finetune.consolidate import CheckpointNotFound, consolidate, resolve_checkpoint
from pipeline.finetune.finetune import (
    FinetuneResult,
    PreparedInit,
    load_source_classes,
    prepare_init_weights,
    read_lineage,
    run,
)
from pipeline.finetune.head import HEAD_MODES, HeadInit, class_children, init_head

__all__ = [
    "HEAD_MODES",
    "CheckpointNotFound",
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneSection",
    "HeadInit",
    "PreparedInit",
    "class_children",
    "consolidate",
    "init_head",
    "load_finetune_config",
    "load_source_classes",
    "prepare_init_weights",
    "read_lineage",
    "resolve_checkpoint",
    "run",
]
