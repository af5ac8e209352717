"""Streaming the MDS shards: StreamingDataset + StreamingDataLoader with sample-exact resume.

Decoding and augmentation run in the DataLoader workers (``__getitem__``). Augmentation draws
from a generator seeded by (run seed, epoch, sample id), so a sample gets the same crop whether
the run was interrupted or not and whatever the number of ranks or workers; the global order
comes from streaming's deterministic shuffle with a pinned ``num_canonical_nodes``.
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
from pipeline.train.streaming_shm import registered_prefixes, release_stale_shared_memory
from pipeline.train.transforms import batch_mix, eval_transform, train_transform

__all__ = ["ImageShards", "MixCollate", "build_eval_loader", "build_train_loader", "cache_root", "local_dirs",
           "registered_prefixes", "release_stale_shared_memory", "streaming_env"]


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


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir, "cache"))


def _local(cfg: TrainConfig, role: str, split: str) -> str:
    # Distinct per role, split and recipe: streaming refuses two live datasets sharing a local directory.
    return str(cache_root(cfg) / f"{cfg.config_hash}-{role}-{split}")


def local_dirs(cfg: TrainConfig) -> list[str]:
    return [_local(cfg, "train", cfg.data.train_split), _local(cfg, "eval", cfg.data.eval_split)]


def build_train_loader(cfg: TrainConfig, plan: Plan) -> StreamingDataLoader:
    ds = ImageShards(
        transform=train_transform(cfg.augment, cfg.model.img_size),
        aug_seed=cfg.seed,
        remote=split_uri(cfg, cfg.data.train_split),
        local=_local(cfg, "train", cfg.data.train_split),
        cache_limit=cfg.data.cache_limit,
        predownload=cfg.data.predownload,
        batch_size=plan.micro_batch_size,
        shuffle=True,
        shuffle_seed=cfg.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed,
        shuffle_algo=cfg.data.shuffle_algo,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )
    mix = batch_mix(cfg.augment, plan.num_classes)
    return StreamingDataLoader(
        ds,
        batch_size=plan.micro_batch_size,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=MixCollate(mix, cfg.seed) if mix else None,
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
