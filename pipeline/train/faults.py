"""Faults for tests, injected through the loop's callbacks (``pipeline.train.callbacks``), never through code
paths inside the loop. A test names them in ``COATNET_CALLBACKS`` and every rank of every launcher loads them::

    COATNET_CALLBACKS="pipeline.train.faults:NonFiniteLoss(step=5)"
    COATNET_CALLBACKS="pipeline.train.faults:LoseWorker(step=6)"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.train.callbacks import Callback

EXIT_MARKER = ".fault-exit-done"


class NonFiniteLoss(Callback):
    """The loss of the first micro-batch of step ``step`` (counted as ``trainer.state.step``, the steps done
    before it) becomes NaN on every rank, once per process. Multiplied, not replaced, so that its gradients
    are NaN too, as a real NaN's would be: the step must be discarded, not merely counted."""

    def __init__(self, step: int) -> None:
        self.step = int(step)
        self.fired = False

    def on_micro_batch_loss(self, trainer: Any, micro: int, loss: torch.Tensor) -> torch.Tensor:
        if micro == 0 and trainer.state.step == self.step and not self.fired:
            self.fired = True
            return loss * float("nan")
        return loss


class LoseWorker(Callback):
    """After step ``step`` (and its checkpoint), the last rank dies abruptly, as a lost machine would; once per
    output directory, so that the restarted job runs through."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_step_end(self, trainer: Any) -> None:
        ctx = trainer.ctx
        marker = Path(trainer.config.output_dir, EXIT_MARKER)
        if trainer.state.step == self.step and ctx.rank == ctx.world_size - 1 and not marker.exists():
            marker.touch()
            os._exit(1)
