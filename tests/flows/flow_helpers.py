"""Constants and helpers of the flow tests (imported by the test modules; fixtures are in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The demo recipes, shrunk: a handful of optimizer steps each, a checkpoint every 2 steps, log lines
# instead of progress bars (pytest captures them).
TINY_PRETRAIN = [
    "train.max_steps=6", "schedule.warmup_epochs=0", "checkpoint.interval_steps=2", "eval.interval_steps=0",
    "logging.interval_steps=1", "logging.progress_bar=false",
]
TINY_FINETUNE = [
    "train.max_steps=2", "checkpoint.interval_steps=0", "logging.interval_steps=1", "logging.progress_bar=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a child started with ``start_new_session=True`` (by its id)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
