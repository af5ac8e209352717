"""Streaming the MDS shards: StreamingDataset + StreamingDataLoader with sample-exact resume.

Decoding and augmentation run in the DataLoader workers (``__getitem__``). Augmentation draws
from a generator seeded by (run seed, epoch, sample id), so a sample gets the same crop whether
the run was interrupted or not and whatever the number of ranks or workers; the global order
comes from streaming's deterministic shuffle with a pinned ``num_canonical_nodes``.

The train loader yields one batch per optimizer step and rank (micro-batch x accumulation), which
``micro_batches`` splits by striding: micro-batch ``a`` takes every ``accum``-th sample. Streaming
deals the samples of a global batch to the ranks by striding too, so micro-batch ``k`` of a step
holds the global batch's samples ``k, k + M, k + 2M, ...`` (M micro-batches per step) on any
number of ranks and nodes: BatchNorm statistics, MixUp pairs, and so the loss curve, stay the
same when a run resumes on another world size with the same global batch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from streaming import StreamingDataLoader, StreamingDataset
from torch.utils.data import default_collate

from pipeline.train.config import Plan, TrainConfig, split_uri
from pipeline.train.transforms import batch_mix, eval_transform, train_transform


def streaming_env(rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
    """The variables streaming reads to know the world (the deepspeed launcher omits LOCAL_WORLD_SIZE)."""
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size),
    })


def _mix_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:  # FNV-1a over the parts: cheap, stable across processes (unlike hash()).
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class ImageShards(StreamingDataset):
    """MDS rows (image bytes, label, key) -> {"image": tensor, "label": int, "idx": int, "key": str}."""

    def __init__(self, *, transform: Callable, aug_seed: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.transform = transform
        self.aug_seed = aug_seed

    def __getitem__(self, idx: int) -> dict:
        row = super().__getitem__(idx)
        img = Image.open(io.BytesIO(row["image"])).convert("RGB")
        if self.aug_seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix_seed(self.aug_seed, self.next_epoch - 1, idx))
                x = self.transform(img)
        return {"image": x, "label": int(row["label"]), "idx": int(idx), "key": str(row.get("key", idx))}


class MixCollate:
    """Collate, then MixUp/CutMix seeded by the batch's sample ids (so it is resume-exact too)."""

    def __init__(self, mix: Callable, seed: int) -> None:
        self.mix = mix
        self.seed = seed

    def __call__(self, rows: list[dict]) -> dict:
        batch = default_collate(rows)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix_seed(self.seed, *batch["idx"].tolist()[:8]))
            batch["image"], batch["label"] = self.mix(batch["image"], batch["label"])
        return batch


class StepCollate:
    """Collate one rank's batch of an optimizer step; MixUp/CutMix within each of its micro-batches."""

    def __init__(self, accum: int, mix: Callable | None, seed: int) -> None:
        self.accum = accum
        self.mix = MixCollate(mix, seed) if mix else None

    def __call__(self, rows: list[dict]) -> dict:
        if self.mix is None:
            return default_collate(rows)
        micro = [self.mix(rows[a::self.accum]) for a in range(self.accum)]
        batch = {}
        for k in micro[0]:
            if isinstance(micro[0][k], torch.Tensor):
                v = torch.empty((len(rows), *micro[0][k].shape[1:]), dtype=micro[0][k].dtype)
                for a, m in enumerate(micro):
                    v[a::self.accum] = m[k]
            else:
                v = [None] * len(rows)
                for a, m in enumerate(micro):
                    v[a::self.accum] = m[k]
            batch[k] = v
        return batch


def micro_batches(batch: dict, accum: int) -> list[dict]:
    """The ``accum`` micro-batches of a step batch: micro-batch ``a`` takes samples ``a, a + accum, ...``."""
    return [{k: v[a::accum] for k, v in batch.items()} for a in range(accum)]


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir, "cache"))


def _local(cfg: TrainConfig, role: str, split: str) -> str:
    # Distinct per role, split and recipe: streaming refuses two live datasets sharing a local directory.
    return str(cache_root(cfg) / f"{cfg.config_hash}-{role}-{split}")


def local_dirs(cfg: TrainConfig) -> list[str]:
    return [_local(cfg, "train", cfg.data.train_split), _local(cfg, "eval", cfg.data.eval_split)]


def registered_prefixes(dirs: list[str]) -> list[int]:
    """Streaming's shared-memory prefixes whose registered local directories include any of ``dirs``."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    mine, found, misses, prefix = set(dirs), [], 0, -1
    # Prefixes are allocated upwards from 0 but leave gaps (a crashed job's file locks block its prefix
    # for good); a long run of gaps means the end.
    while misses < 4096:
        prefix += 1
        try:
            shm = SharedMemory(_get_path(prefix, LOCALS), create=False, auto_cleanup=False)
        except FileNotFoundError:
            misses += 1
            continue
        except PermissionError:
            continue
        misses = 0
        try:
            theirs, _ = _unpack_locals(bytes(shm.buf))
        finally:
            shm.cleanup()
        if mine & set(theirs):
            found.append(prefix)
    return found


def release_stale_shared_memory(dirs: list[str]) -> int:
    """Unlink streaming's shared memory registered for these local directories; returns how many sets.

    Called on each node before this run creates its datasets: any registration of its own (run-unique)
    directories then belongs to a killed earlier process of the same run, and can make streaming
    refuse them ("Reused local directory"). Unlike streaming's clean_stale_shared_memory(), this
    leaves other jobs on the node alone.
    """
    import _posixshmem  # what multiprocessing.shared_memory itself calls; bypasses its resource tracker

    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path

    prefixes = registered_prefixes(dirs)
    for prefix in prefixes:
        for name in SHM_TO_CLEAN:
            try:
                _posixshmem.shm_unlink("/" + _get_path(prefix, name))
            except FileNotFoundError:
                pass
    return len(prefixes)


def build_train_loader(cfg: TrainConfig, plan: Plan) -> StreamingDataLoader:
    """Yields one batch per optimizer step (``micro_batches`` splits it), see the module docstring."""
    step_batch = plan.micro_batch_size * plan.grad_accum_steps
    ds = ImageShards(
        transform=train_transform(cfg.augment, cfg.model.img_size),
        aug_seed=cfg.seed,
        remote=split_uri(cfg, cfg.data.train_split),
        local=_local(cfg, "train", cfg.data.train_split),
        cache_limit=cfg.data.cache_limit,
        predownload=cfg.data.predownload,
        batch_size=step_batch,
        shuffle=True,
        shuffle_seed=cfg.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed,
        shuffle_algo=cfg.data.shuffle_algo,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )
    mix = batch_mix(cfg.augment, plan.num_classes)
    return StreamingDataLoader(
        ds,
        batch_size=step_batch,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=StepCollate(plan.grad_accum_steps, mix, cfg.seed),
        # Worker seeding must not draw from the global RNG: that would shift the dropout / drop-path
        # stream of a resumed run (its loader starts at another point of the RNG sequence).
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_eval_loader(cfg: TrainConfig) -> StreamingDataLoader:
    ds = ImageShards(
        transform=eval_transform(cfg.augment, cfg.eval, cfg.model.img_size),
        aug_seed=None,
        remote=split_uri(cfg, cfg.data.eval_split),
        local=_local(cfg, "eval", cfg.data.eval_split),
        cache_limit=cfg.data.cache_limit,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )
    return StreamingDataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=min(cfg.data.num_workers, 2),
                               drop_last=False, pin_memory=torch.cuda.is_available())
