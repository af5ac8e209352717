"""Checkpoints: DeepSpeed's sharded layout, a "latest" marker written only when every rank is done,
keep-last-K pruning, an optional object-storage copy, resume selection, and elastic resume.

Layout (``{output_dir}/checkpoints``)::

    step_00000100/            engine.save_checkpoint(tag=...) files of every rank
    step_00000100/rank_00000.pt   this rank's RNG states (ranks draw different dropout masks)
    step_00000100/ema/        the sharded EMA, itself a DeepSpeed ZeRO checkpoint of the EMA weights (ema.py)
    step_00000100/manifest.json   written by rank 0 just before complete.json: size and hash of every file
    step_00000100/complete.json   written by rank 0 after a barrier: step, config hash, world size
    damaged/step_00000100/    a checkpoint that failed its manifest on resume, kept aside (never deleted)
    step_00000100/universal/  made on demand: DeepSpeed's universal checkpoint of this step (cached)
    latest                    the newest complete tag (the same file DeepSpeed and zero_to_fp32 read)

Elastic resume: a checkpoint written by N ranks resumes on M ranks through DeepSpeed's universal
checkpoint. ``ds_to_universal`` (DeepSpeed's own converter, run in a subprocess) turns the step into
one folder per parameter (fp32 weights, Adam moments; the EMA adds its own ``ema.pt``), from which
each of the M ranks cuts its new partition; the engine must be built with ``load_universal``
(``ResumePoint.needs_universal`` says so before it is built). The conversion runs once, when the
world size changed, and is cached in the step directory. The loader state is global (samples seen
by all ranks) and needs no conversion; RNG states are per rank and follow the rank number.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.errors import UserError
from pipeline.train import ema as ema_mod
from pipeline.train import manifest

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"
LATEST = "latest"
DAMAGED = "damaged"
UNIVERSAL = "universal"


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


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume from, with what its marker says about it."""

    root: Path
    tag: str
    step: int
    world_size: int
    config_hash: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @classmethod
    def read(cls, root: Path, tag: str) -> ResumePoint:
        marker = json.loads((root / tag / COMPLETE).read_text())
        return cls(root, tag, int(marker["step"]), int(marker["world_size"]), str(marker["config_hash"]))

    def needs_universal(self, world_size: int) -> bool:
        """True when resuming on ``world_size`` ranks goes through a universal checkpoint.

        Only partitioned state needs it: a checkpoint without ZeRO optimizer shards (stage 0, fp32)
        loads on any world size as it is.
        """
        return world_size != self.world_size and any(self.path.glob("*_optim_states.pt"))


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
             tag: str | None = None, mark_latest: bool = True, ema=None) -> Path:
        """Collective: every rank must call it. ``ema``: a ShardedEma, saved beside the weights."""
        # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        tag = tag or tag_for(step)
        path = self.directory / tag
        # What ds_to_universal asks of the client ("Verify that client creates this state").
        client_state = {**client_state,
                        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        if ema is not None:
            ema.save(path)
        torch.save(rng_state(), path / f"rank_{self.rank:05d}.pt")
        _barrier()
        if self.upload_uri and self.local_rank == 0:
            # Every node uploads what it wrote (on a shared filesystem the same files, harmlessly).
            storage.upload_dir(path, storage.join(self.upload_uri, tag))
        _barrier()
        if self.rank == 0:
            marker = {"tag": tag, "step": step, "config_hash": config_hash, "world_size": world_size,
                      "time": time.time()}
            # Before the marker, so that every complete checkpoint has one (manifest.py). It covers the files
            # on rank 0's filesystem: all of them on one node or a shared filesystem.
            record = manifest.write(path)
            if self.upload_uri:
                storage.write_text(storage.join(self.upload_uri, tag, manifest.MANIFEST), json.dumps(record, indent=1))
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

    def _set_aside_damaged(self) -> None:
        """Newest first, move complete checkpoints that fail their manifest to ``damaged/`` until an intact one."""
        for tag in reversed(complete_tags(self.directory)):
            wrong = manifest.problem(self.directory / tag)
            if wrong is None:
                return
            dest = self.directory / DAMAGED / tag
            if dest.exists():
                dest = dest.with_name(f"{tag}.{int(time.time())}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / tag).rename(dest)
            print(f"checkpoint {tag} is damaged: {wrong}; moved aside to {dest}, trying the one before it",
                  flush=True)

    def _latest_remote(self) -> str | None:
        """The newest complete tag of the object-storage copy, without downloading it."""
        if not self.upload_uri:
            return None
        latest_uri = storage.join(self.upload_uri, LATEST)
        if storage.exists(latest_uri):
            tag = storage.read_text(latest_uri).strip()
            if storage.exists(storage.join(self.upload_uri, tag, COMPLETE)):
                return tag
        return None

    def _fetch_remote(self) -> str | None:
        """Download the newest complete remote checkpoint (node-local rank 0 of every node)."""
        tag = self._latest_remote()
        if tag and self.local_rank == 0 and not (self.directory / tag / COMPLETE).is_file():
            storage.download_dir(storage.join(self.upload_uri, tag), self.directory / tag)
        return tag

    def resume_step(self) -> int | None:
        """The step ``find("auto")`` would resume from (local, then the object-storage copy), or None; reads
        markers only: nothing is downloaded, no collective (for a launcher's summary before the ranks start)."""
        tag = self._latest_local() or self._latest_remote()
        m = TAG_RE.match(tag) if tag else None
        return int(m.group(1)) if m else None

    def find(self, resume: str) -> ResumePoint | None:
        """Where to resume from: ``"none"``, ``"auto"`` (newest complete, local then remote) or a path.

        A path may be a checkpoint directory (``.../step_00000100``) or a checkpoints root
        (its ``latest`` is used). Collective when the remote copy is consulted.
        """
        if resume == "none":
            return None
        if resume == "auto":
            if self.local_rank == 0:
                self._set_aside_damaged()
            _barrier()
            tag = self._latest_local()
            if tag is None and (self.directory / DAMAGED).is_dir() and not self.upload_uri:
                raise ResumeError(
                    f"no intact checkpoint under {self.directory}: the damaged ones are kept in "
                    f"{self.directory / DAMAGED}; start afresh with --resume none, or name one with --resume PATH")
            if tag is None and self.upload_uri:
                tag = self._fetch_remote()
                _barrier()
            return ResumePoint.read(self.directory, tag) if tag else None
        p = Path(resume)
        if (p / COMPLETE).is_file():
            return ResumePoint.read(p.parent, p.name)
        if (p / LATEST).is_file():
            tag = (p / LATEST).read_text().strip()
            if (p / tag / COMPLETE).is_file():
                return ResumePoint.read(p, tag)
        raise ResumeError(f"--resume {resume}: no complete checkpoint there (missing {COMPLETE} or {LATEST})")

    def load(self, engine, point: ResumePoint, *, config_hash: str, world_size: int, force: bool,
             ema=None) -> dict:
        """Restore engine (weights, optimizer, schedule), EMA and RNG; returns the client state. Collective."""
        if point.config_hash != config_hash and not force:
            raise ResumeError(
                f"checkpoint {point.path} was written by a different recipe (config hash {point.config_hash}, "
                f"this run {config_hash}); resume with --resume none for a fresh run, or force it (--force-resume)"
            )
        if point.needs_universal(world_size):
            return self._load_universal(engine, point, world_size=world_size, ema=ema)
        # Under ZeRO-3 the module file holds empty placeholders for parameters (they come back from the
        # fp32 partitions of the optimizer state); loading them would trip the model's own load hook,
        # which checks head and table shapes. Only the buffers are taken from it.
        skip_module = {"custom_load_fn": _load_buffers_only} if engine.zero_optimization_partition_weights() else {}
        try:
            _, client_state = engine.load_checkpoint(str(point.root), tag=point.tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True, **skip_module)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's zip reader on a cut file
            raise ResumeError(f"checkpoint {point.path} cannot be read ({' '.join(str(e).split())[:200]}); "
                              f"check it with `coatnet checkpoints verify {point.root.parent}`, or resume from "
                              "another with --resume PATH") from e
        if client_state is None:
            raise ResumeError(f"DeepSpeed could not load {point.path}")
        if ema is not None:
            ema.load(point.path)
        self._load_rng(point)
        return client_state

    def _load_rng(self, point: ResumePoint) -> None:
        # Another world size: rank r takes rank r's states where there was one (the streams of dropout and
        # drop-path masks are per rank anyway); data order and augmentation do not depend on them.
        rng_file = point.path / f"rank_{self.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))

    def _load_universal(self, engine, point: ResumePoint, *, world_size: int, ema) -> dict:
        if not engine.load_universal_checkpoint():
            raise ResumeError(
                f"checkpoint {point.path} was written by {point.world_size} ranks, this run has {world_size}: the "
                "engine must be built for a universal checkpoint (engine.initialize(..., load_universal=True), "
                "as ResumePoint.needs_universal says)")
        universal = self.universal(point)
        groups = _hyperparameters(engine)
        _, client_state = engine.load_checkpoint(str(point.path), tag=UNIVERSAL, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise ResumeError(f"DeepSpeed could not load the universal checkpoint {universal}")
        _repair_universal_optimizer(engine, groups)
        # A universal load restores parameters and optimizer state only: buffers (BatchNorm statistics) come
        # from rank 0's module file, which the converter copied.
        name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if engine.zero_optimization_partition_weights() \
            else "mp_rank_00_model_states.pt"
        _load_buffers_only(torch.load(universal / name, map_location="cpu", mmap=True, weights_only=False)["module"],
                           engine.module)
        if ema is not None:
            ema.load_universal(universal)
        self._load_rng(point)
        return client_state

    def universal(self, point: ResumePoint) -> Path:
        """DeepSpeed's universal checkpoint of ``point`` (``{step}/universal``), converted once and cached.

        Collective. Global rank 0 converts; on nodes that do not share its filesystem, node-local rank 0
        converts its own (downloaded) copy.
        """
        out = point.path / UNIVERSAL
        if not (out / COMPLETE).is_file():
            if self.rank == 0:
                convert_to_universal(point.path)
            _barrier()
            if self.local_rank == 0 and not (out / COMPLETE).is_file():
                convert_to_universal(point.path)
            _barrier()
        return out


def _repair_universal_optimizer(engine, groups: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), which make the first steps after an
    elastic resume differ from the uninterrupted run's:

    - every parameter group gets the first group's hyperparameters ("Generally, the hyperparameters of
      each parameter should be the same"): weight decay on norms, biases and tables. The recipe's own
      are put back (the config hash is the checkpoint's);
    - every group's Adam ``step`` is one shared tensor, which AdamW increments in place once per group
      and step: later groups see a step count too high in their bias correction. Each gets its own.
    """
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if engine.zero_optimization_partition_weights():
        for group, saved in zip(opt.param_groups, groups):
            group.update(saved)
    for state in opt.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _hyperparameters(engine) -> list[dict]:
    """Per optimizer parameter group, what the recipe sets (not the parameters, not the scheduled LR)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in opt.param_groups]


def convert_to_universal(step_dir: Path) -> Path:
    """``{step_dir}/universal`` from DeepSpeed's ``ds_to_universal`` (plus the EMA's per-parameter files)."""
    out = step_dir / UNIVERSAL
    tmp = step_dir / f".{UNIVERSAL}.tmp-{os.getpid()}"
    src = step_dir / f".{UNIVERSAL}.src-{os.getpid()}"
    for d in (tmp, src):
        shutil.rmtree(d, ignore_errors=True)
    # The converter walks its input folder recursively: it gets the engine's files alone (links), not
    # the EMA's sub-directory, which holds files of the same names.
    src.mkdir()
    for f in step_dir.iterdir():
        if f.is_file() and f.name.endswith(("_model_states.pt", "_optim_states.pt")):
            (src / f.name).symlink_to(f.resolve())
    log = step_dir / f".{UNIVERSAL}.log"
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.time()
    # A subprocess: the converter forks worker pools, which a rank holding CUDA and NCCL state must not do.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]  # checkpoints written before the trainer recorded it
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    shutil.rmtree(src, ignore_errors=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise ResumeError(f"DeepSpeed's ds_to_universal failed on {step_dir} (status {done.returncode}):\n{tail}")
    if (step_dir / ema_mod.EMA_DIR).is_dir():
        ema_mod.write_universal(step_dir, tmp)
    marker = json.loads((step_dir / COMPLETE).read_text()) if (step_dir / COMPLETE).is_file() else {}
    (tmp / COMPLETE).write_text(json.dumps({"source": str(step_dir), "step": marker.get("step"),
                                            "source_world_size": marker.get("world_size"),
                                            "seconds": round(time.time() - t0, 1)}, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another node on a shared filesystem finished first: same content
        shutil.rmtree(tmp, ignore_errors=True)
    # ds_to_universal wrote its marker beside its output, pointing at the temporary name; DeepSpeed's
    # convention (load_checkpoint(step_dir) with load_universal and no tag) wants it to name the folder.
    (step_dir / "latest_universal").write_text(UNIVERSAL)
    return out
