"""Hooks the training loop calls at its events, so that what is not training (fault injection for tests,
recording the samples of each step) stays out of the loop's body. Composer's event callbacks are the model.

Callbacks come from the code that builds the ``Trainer`` and from the environment: ``COATNET_CALLBACKS``
names factories, ``module:factory`` or ``module:factory(key=value, ...)`` with literal values, several
separated by ``;``. Every launcher passes the environment on to its ranks (child processes inherit it; Ray
Train workers get ``pipeline.train.launcher.FORWARDED_ENV``), so a test sets it once and every rank loads
the same callbacks::

    COATNET_CALLBACKS="pipeline.train.faults:NonFiniteLoss(step=5)"
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import RunDir

CALLBACKS_ENV = "COATNET_CALLBACKS"
_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<name>[A-Za-z_]\w*)\s*(?:\((?P<args>.*)\))?$", re.DOTALL)


class Callback:
    """Override the events you need; ``trainer`` is the running ``pipeline.train.trainer.Trainer``."""

    def on_micro_batch_loss(self, trainer: Any, micro: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of micro-batch ``micro`` of the current step, before its backward; return the loss to use."""
        return loss

    def on_micro_batch_end(self, trainer: Any, micro: int, batch: dict) -> None:
        """After the backward of micro-batch ``micro`` (``trainer.state.step`` is the step being taken)."""

    def on_step_end(self, trainer: Any) -> None:
        """After an optimizer step and what follows it (EMA, logging, evaluation, checkpoint)."""


class Callbacks(Callback):
    """Several callbacks, called in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_micro_batch_loss(self, trainer: Any, micro: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.callbacks:
            loss = cb.on_micro_batch_loss(trainer, micro, loss)
        return loss

    def on_micro_batch_end(self, trainer: Any, micro: int, batch: dict) -> None:
        for cb in self.callbacks:
            cb.on_micro_batch_end(trainer, micro, batch)

    def on_step_end(self, trainer: Any) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer)


class CallbackError(ValueError):
    """A callback named in the environment cannot be loaded."""


def load_callback(spec: str) -> Callback:
    m = _SPEC.match(spec.strip())
    if not m:
        raise CallbackError(f"{CALLBACKS_ENV}: {spec!r} is not module:factory or module:factory(key=value, ...)")
    kwargs: dict[str, Any] = {}
    if m["args"] and m["args"].strip():
        try:
            call = ast.parse(f"f({m['args']})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
                raise ValueError("arguments must be key=value")
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError) as e:
            raise CallbackError(f"{CALLBACKS_ENV}: {spec!r}: {e}") from e
    try:
        factory = getattr(importlib.import_module(m["module"]), m["name"])
    except (ImportError, AttributeError) as e:
        raise CallbackError(f"{CALLBACKS_ENV}: {spec!r}: {e}") from e
    cb = factory(**kwargs)
    if not isinstance(cb, Callback):
        raise CallbackError(f"{CALLBACKS_ENV}: {spec!r} made a {type(cb).__name__}, not a Callback")
    return cb


def _split(value: str) -> list[str]:
    """``;``-separated specs; a ``;`` inside parentheses or a quoted argument does not separate."""
    specs, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(value):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == ";" and depth == 0:
            specs.append(value[start:i])
            start = i + 1
    return [x for x in [*specs, value[start:]] if x.strip()]


def from_env(environ: dict[str, str] | None = None) -> list[Callback]:
    return [load_callback(s) for s in _split((os.environ if environ is None else environ).get(CALLBACKS_ENV, ""))]


class RecordSamples(Callback):
    """``train.record_samples``: the keys of every micro-batch, per rank, as JSON lines (tests of sample-exact
    resume read them back; a step redone after a resume appends its lines again, and later lines win)."""

    def __init__(self, output_dir: str | Path, rank: int) -> None:
        self.path = RunDir(str(output_dir)).local(RunDir.SAMPLES, f"rank{rank:05d}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_micro_batch_end(self, trainer: Any, micro: int, batch: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.state.step, "micro": micro, "keys": list(batch["key"])}) + "\n")
