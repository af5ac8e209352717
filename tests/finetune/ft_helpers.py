"""Constants and helpers shared by the fine-tuning tests (a uniquely named module: several conftest.py exist)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Other engineers' streaming jobs may share this machine: never unlink their shared memory.
COMMON = ["data.clean_stale_shared_memory=false", "logging.progress_bar=false"]
# The demo pretraining recipe, shortened for the tests: 2 epochs of 88 steps, softmax at a constant 5e-4.
# (With the demo's sigmoid loss at 3e-3, coatnet_pico learns little in so few steps, and fine-tuning
# from it is worse than from scratch; at 5e-4 it reaches ~40% top-1 on the 40 classes in 2 epochs.)
PRETRAIN_SHORT = [
    "train.epochs=2", "train.global_batch_size=64", "train.micro_batch_size=32",
    "loss.type=softmax", "loss.label_smoothing=0.0", "optim.lr=5e-4", "optim.min_lr=5e-4",
    "schedule.type=constant", "schedule.warmup_epochs=0",
    "eval.interval_steps=0", "checkpoint.interval_steps=0",
]
# Fine-tuning in the tests: the demo recipe with 2 epochs (44 steps) instead of 4.
FINETUNE_SHORT = ["train.epochs=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_overrides(shards: dict[str, str], pretrained: Path | str, out: Path | str) -> list[str]:
    return [*COMMON, f"finetune.pretrained={pretrained}", f"finetune.source_classes={shards['digits21k']}",
            f"data.root={shards['digits']}", f"output_dir={out}", *FINETUNE_SHORT]


def wait_http_ok(url: str, proc: subprocess.Popen, timeout: float, what: str, log: Path | None = None) -> None:
    """Until ``url`` answers 200; fails at once when ``proc`` (the server) exits, with ``log``'s tail if given."""
    tail = (lambda: "\n" + log.read_text()[-3000:]) if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{what} at {url} not ready after {timeout}s{tail()}")
