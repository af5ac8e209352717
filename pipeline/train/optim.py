"""AdamW parameter groups and learning-rate schedules.

The optimizer itself is built by DeepSpeed from the config (engine.py); this module only
decides which parameters decay and what the learning rate is at each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and norms / biases / relative-position tables without decay.

    Names in ``model.no_weight_decay()`` (the model's relative-position tables) are matched as
    exact names or as a suffix after a dot, so both ``"rel_pos.table"`` and a bare leaf name work.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        # ds_shape: a ZeRO-3 partitioned parameter is an empty 1-D tensor that keeps its real shape there.
        if len(getattr(p, "ds_shape", p.shape)) <= 1 or leaf == "bias" or name in skip or leaf in skip or any(name.endswith("." + s) for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, *, total_steps: int, warmup_steps: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then decay to min_lr."""
    peak, low = optim.lr, optim.min_lr
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule.type == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule.type == "linear":
        return low + (peak - low) * (1.0 - t)
    return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * t))


def lr_scheduler_factory(*, total_steps: int, warmup_steps: int, optim: OptimConfig,
                         schedule: ScheduleConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """A callable DeepSpeed turns into the scheduler it steps (and checkpoints) at each optimizer step."""
    def factor(step: int) -> float:
        return lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, optim=optim, schedule=schedule) / optim.lr

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return build
