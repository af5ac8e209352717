"""Checkpoints: DeepSpeed's sharded layout, a "latest" marker written only when every rank is done,
keep-last-K pruning, an optional object-storage copy, and resume selection.

Layout (``{output_dir}/checkpoints``)::

    step_00000100/            engine.save_checkpoint(tag=...) files of every rank
    step_00000100/rank_00000.pt   this rank's RNG states (ranks draw different dropout masks)
    step_00000100/complete.json   written by rank 0 after a barrier: step, config hash, world size
    latest                    the newest complete tag (the same file DeepSpeed and zero_to_fp32 read)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.errors import UserError

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"
LATEST = "latest"


class ResumeError(UserError, RuntimeError):
    """The checkpoint cannot be resumed as asked (different recipe, incomplete, missing)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def complete_tags(directory: Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


@torch.no_grad()
def _load_buffers_only(src: dict, dst: torch.nn.Module) -> None:
    """ZeRO-3: parameters come from the optimizer's fp32 partitions; buffers (BatchNorm statistics) from here."""
    for name, buf in dst.named_buffers():
        if name in src:
            buf.copy_(src[name])


class CheckpointManager:
    def __init__(self, directory: str | Path, *, keep_last: int, upload_uri: str | None, rank: int,
                 local_rank: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.upload_uri = upload_uri
        self.rank = rank
        self.local_rank = local_rank

    # -- saving ----------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any], *, config_hash: str, world_size: int,
             tag: str | None = None, mark_latest: bool = True) -> Path:
        """Collective: every rank must call it."""
        tag = tag or tag_for(step)
        path = self.directory / tag
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), path / f"rank_{self.rank:05d}.pt")
        _barrier()
        if self.upload_uri and self.local_rank == 0:
            # Every node uploads what it wrote (on a shared filesystem the same files, harmlessly).
            storage.upload_dir(path, storage.join(self.upload_uri, tag))
        _barrier()
        if self.rank == 0:
            marker = {"tag": tag, "step": step, "config_hash": config_hash, "world_size": world_size,
                      "time": time.time()}
            (path / COMPLETE).write_text(json.dumps(marker, indent=2))
            if self.upload_uri:
                storage.write_text(storage.join(self.upload_uri, tag, COMPLETE), json.dumps(marker, indent=2))
            if mark_latest:
                tmp = self.directory / f".{LATEST}.tmp"
                tmp.write_text(tag)
                tmp.replace(self.directory / LATEST)
                if self.upload_uri:
                    storage.write_text(storage.join(self.upload_uri, LATEST), tag)
                self._prune(keep=tag)
        _barrier()
        return path

    def _prune(self, keep: str) -> None:
        tags = complete_tags(self.directory)
        for old in tags[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(self.directory / old, ignore_errors=True)
                if self.upload_uri:
                    storage.delete_prefix(storage.join(self.upload_uri, old))
        # Tags without a marker are interrupted saves older than the one just completed.
        for p in self.directory.iterdir():
            if TAG_RE.match(p.name) and not (p / COMPLETE).is_file() and p.name < keep:
                shutil.rmtree(p, ignore_errors=True)

    # -- resuming --------------------------------------------------------------------------------
    def _latest_local(self) -> str | None:
        marker = self.directory / LATEST
        if marker.is_file():
            tag = marker.read_text().strip()
            if (self.directory / tag / COMPLETE).is_file():
                return tag
        tags = complete_tags(self.directory)
        return tags[-1] if tags else None

    def _fetch_remote(self) -> str | None:
        """Download the newest complete remote checkpoint (node-local rank 0 of every node)."""
        if not self.upload_uri:
            return None
        tag = None
        latest_uri = storage.join(self.upload_uri, LATEST)
        if storage.exists(latest_uri):
            tag = storage.read_text(latest_uri).strip()
            if not storage.exists(storage.join(self.upload_uri, tag, COMPLETE)):
                tag = None
        if tag and self.local_rank == 0 and not (self.directory / tag / COMPLETE).is_file():
            storage.download_dir(storage.join(self.upload_uri, tag), self.directory / tag)
        return tag

    def find(self, resume: str) -> tuple[Path, str] | None:
        """Where to resume from: ``"none"``, ``"auto"`` (newest complete, local then remote) or a path.

        A path may be a checkpoint directory (``.../step_00000100``) or a checkpoints root
        (its ``latest`` is used). Collective when the remote copy is consulted.
        """
        if resume == "none":
            return None
        if resume == "auto":
            tag = self._latest_local()
            if tag is None and self.upload_uri:
                tag = self._fetch_remote()
                _barrier()
            return (self.directory, tag) if tag else None
        p = Path(resume)
        if (p / COMPLETE).is_file():
            return p.parent, p.name
        if (p / LATEST).is_file():
            tag = (p / LATEST).read_text().strip()
            if (p / tag / COMPLETE).is_file():
                return p, tag
        raise ResumeError(f"--resume {resume}: no complete checkpoint there (missing {COMPLETE} or {LATEST})")

    def load(self, engine, root: Path, tag: str, *, config_hash: str, world_size: int, force: bool) -> dict:
        marker = json.loads((root / tag / COMPLETE).read_text())
        if marker["config_hash"] != config_hash and not force:
            raise ResumeError(
                f"checkpoint {root / tag} was written by a different recipe (config hash {marker['config_hash']}, "
                f"this run {config_hash}); resume with --resume none for a fresh run, or force it (--force-resume)"
            )
        if marker["world_size"] != world_size:
            raise ResumeError(
                f"checkpoint {root / tag} was written by {marker['world_size']} ranks, this run has {world_size}; "
                "convert it with DeepSpeed's ds_to_universal.py and load it as a universal checkpoint"
            )
        # Under ZeRO-3 the module file holds empty placeholders for parameters (they come back from the
        # fp32 partitions of the optimizer state); loading them would trip the model's own load hook,
        # which checks head and table shapes. Only the buffers are taken from it.
        skip_module = {"custom_load_fn": _load_buffers_only} if engine.zero_optimization_partition_weights() else {}
        _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True, **skip_module)
        if client_state is None:
            raise ResumeError(f"DeepSpeed could not load {root / tag}")
        rng_file = root / tag / f"rank_{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client_state
