"""One optimizer step: the micro-batches of a global batch through forward and backward, then DeepSpeed's step.

No host synchronisation per micro-batch. The losses stay on the device; whether every one of them was finite, on
every rank, is decided once per step, by one all-reduce just before the last backward. A step with a non-finite
loss is discarded whole (no optimizer update, no LR-schedule step, gradients dropped), by DeepSpeed's own machinery
for overflowed steps: the last backward is given a NaN loss, and the optimizers that check the gradients' norm (ZeRO
1-3 at any precision, bf16 without ZeRO) throw the step away as they do an fp16 overflow, then say so through
``engine.was_step_applied()``. The plain fp32 optimizer of ZeRO-0 checks nothing; there the last backward is not
run, the gradients are dropped and the step ends off the accumulation boundary. Either way a discarded step leaves
no trace: the next step gives the same weights as if it had never been attempted (tests/train/test_step.py).

A step DeepSpeed discards on its own (finite losses, non-finite gradients) is reported the same way.

Masked samples (``keep`` False in the batch, ``data.py``) weigh 0. DeepSpeed divides each micro-batch's loss by the
accumulation steps and averages the gradients over the ranks, so a micro-batch's loss is its kept samples' summed
loss divided by ``K / (accum x ranks)``, K being the kept samples of the whole optimizer step on every rank (one
all-reduce per step, queued on the device without waiting): every kept sample weighs ``1 / K`` however they fell
on micro-batches and ranks, and with nothing masked the loss is the plain mean as before. Shapes stay static:
masked samples still run through the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.train.callbacks import Callback, Callbacks


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over the micro-batches, on the device: read only when the loop logs
    losses: torch.Tensor  # one per micro-batch, on the device
    applied: bool  # False: the step was discarded (non-finite loss or gradients on some rank)
    images: int  # kept (not masked) samples of the step, on every rank together
    data_wait: float  # seconds spent waiting for batches
    batches: list[dict] = field(default_factory=list)  # the micro-batches, when asked to keep them


class TrainStep:
    """``step(batches) -> StepResult``: ``grad_accum_steps`` micro-batches from ``batches``, one optimizer step.

    ``all_true(flag) -> bool`` is the one host synchronisation (every rank must agree to discard a step);
    ``all_sum(tensor) -> tensor`` sums the kept-sample count over the ``world_size`` ranks on the device (None: one
    rank); ``inputs(batch)`` makes the model's input and target on the device; ``loss_fn(logits, target, weight,
    normaliser)`` (``loss.py``). Batches without ``keep`` weigh every sample alike. Callbacks see each
    micro-batch's loss and its end.
    """

    def __init__(self, engine, loss_fn: Callable, inputs: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], *,
                 grad_accum_steps: int, all_true: Callable[[torch.Tensor], bool], device: torch.device,
                 callbacks: Callback | None = None, owner: Any = None,
                 all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1) -> None:
        self.engine = engine
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.grad_accum_steps = grad_accum_steps
        self.all_true = all_true
        self.all_sum = all_sum
        self.world_size = world_size
        self.device = device
        self.callbacks = callbacks or Callbacks()
        self.owner = owner  # what the callbacks are handed (the trainer)
        # The attribute DeepSpeed itself reads after an optimizer step to tell an overflowed (discarded) step.
        self.discards_nonfinite = hasattr(engine.optimizer, "overflow")

    def __call__(self, batches: Iterator[dict], *, keep_batches: bool = False) -> StepResult:
        n = self.grad_accum_steps
        losses = torch.empty(n, dtype=torch.float32, device=self.device)
        kept, wait, applied = [], 0.0, False
        # The step's micro-batches are slices of one loader batch (data.micro_batches): taking them all first
        # costs nothing and gives the step's kept count before the first backward needs it.
        step_batches = []
        for _ in range(n):
            t0 = time.perf_counter()
            step_batches.append(next(batches))
            wait += time.perf_counter() - t0
        keeps = [b.get("keep") for b in step_batches]
        weighted = all(k is not None for k in keeps)
        if weighted:
            local = sum(int(k.sum()) for k in keeps)  # host tensors from the loader: no device sync
            # A fill kernel, not a copy from the host: a host-to-device copy would wait for the previous step.
            step_kept = torch.full((), float(local), dtype=torch.float64, device=self.device)
            if self.all_sum is not None and self.world_size > 1:
                step_kept = self.all_sum(step_kept)
            # A step of masked samples only (a tiny dataset) gets a zero loss, not 0/0 (a "non-finite" skip).
            share = (step_kept.clamp(min=1.0) / (n * self.world_size)).float()
        for micro, batch in enumerate(step_batches):
            x, y = self.inputs(batch)
            logits = self.engine(x)
            raw = self.loss_fn(logits, y, batch["keep"].to(self.device, non_blocking=True), share) \
                if weighted else self.loss_fn(logits, y)
            loss = self.callbacks.on_micro_batch_loss(self.owner, micro, raw)
            losses[micro] = loss.detach()
            if micro < n - 1:
                self.engine.backward(loss)
                self.engine.step()  # inside the accumulation: DeepSpeed only counts the micro-step
            else:
                finite = self.all_true(torch.isfinite(losses).all())  # the step's one host synchronisation
                if weighted:  # the count's all-reduce came before that sync: read now, before more work is queued
                    images = round(step_kept.item())
                applied = self._last_backward_and_step(loss, discard=not finite)
            if keep_batches:
                kept.append(batch)
            self.callbacks.on_micro_batch_end(self.owner, micro, batch)
        if not weighted:
            images = sum(len(b["label"]) for b in step_batches) * self.world_size
        return StepResult(losses.mean(), losses, applied, images, wait, kept)

    def _last_backward_and_step(self, loss: torch.Tensor, *, discard: bool) -> bool:
        engine = self.engine
        if not discard:
            engine.backward(loss)
            engine.step()
            return engine.was_step_applied()  # False when DeepSpeed found non-finite gradients itself
        if self.discards_nonfinite:
            engine.backward(loss * float("nan"))  # non-finite gradients, whatever the accumulated ones were
            engine.step()
            if engine.was_step_applied():
                raise RuntimeError("DeepSpeed applied an optimizer step with non-finite gradients; the trainer "
                                   "relies on its optimizers discarding such steps")
        else:
            engine.zero_grad()  # ZeRO-0 accumulates in param.grad only
            engine.set_gradient_accumulation_boundary(False)
            engine.step()  # counts the micro-step, updates nothing
            engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step counting
        return False
