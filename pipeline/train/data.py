"""Streaming the MDS shards: StreamingDataset + StreamingDataLoader with sample-exact resume.

Decoding and augmentation run in the DataLoader workers (``__getitem__``), which send uint8 pixels;
scaling, normalisation and MixUp/CutMix run on the device after the copy (``device_input.to_device``).
Augmentation draws from a generator seeded by (run seed, epoch, sample id), so a sample gets the same
crop whether the run was interrupted or not and whatever the number of ranks or workers; the global
order comes from streaming's deterministic shuffle with a pinned ``num_canonical_nodes``.

The train loader yields one batch per optimizer step and rank (micro-batch x accumulation), which
``micro_batches`` splits by striding: micro-batch ``a`` takes every ``accum``-th sample. Streaming
deals the samples of a global batch to the ranks by striding too, so micro-batch ``k`` of a step
holds the global batch's samples ``k, k + M, k + 2M, ...`` (M micro-batches per step) on any
number of ranks and nodes: BatchNorm statistics, MixUp pairs, and so the loss curve, stay the
same when a run resumes on another world size with the same global batch.

Samples the sharding job *masked* (duplicates found across its parts after their shards were written:
manifest ``splits[split]["masked"]``) stay in the stream, so that streaming's order, its resume state
and the static batch shapes are those of the shards; each sample carries ``keep`` (False when masked),
which zeroes its weight in the loss (``loss.py``, ``step.py``), the sample counts and evaluation.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataLoader, StreamingDataset

from pipeline.artifacts import Manifest, RunDir
from pipeline.data.manifest import is_kept, masked_indices
from pipeline.train.config import Plan, TrainConfig, dataset_manifest, split_uri
from pipeline.train.streaming_shm import release_stale_shared_memory
from pipeline.train.transforms import augment_seed, eval_resize, to_uint8_hwc, train_augment

# release_stale_shared_memory: re-exported, the trainer's entry to streaming_shm.
__all__ = ["ImageShards", "build_eval_loader", "build_train_loader", "cache_root", "decode", "is_kept", "local_dirs",
           "masked_indices", "release_stale_shared_memory", "streaming_env"]


def streaming_env(rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
    """The variables streaming reads to know the world (the deepspeed launcher omits LOCAL_WORLD_SIZE)."""
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size),
    })


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes -> an RGB PIL image (decoded on first use by the transform).

    PIL's JPEG decoder (libjpeg-turbo) gave the same pixels as torchvision.io.decode_jpeg on the shards'
    JPEGs and is as fast once the redundant RGB-to-RGB copy is skipped; the augmentation needs a PIL
    image anyway (benchmarks/loader_throughput.py measures both, with their pixel difference).
    """
    img = Image.open(io.BytesIO(data))
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageShards(StreamingDataset):
    """MDS rows (image bytes, label, key) -> {"image": uint8 (H, W, 3) tensor, "label": int, "idx": int, "key": str,
    "keep": bool}.

    ``transform``: PIL image -> PIL image (``transforms.train_augment`` or ``eval_resize``); with ``aug_seed``
    its draws are seeded by (aug_seed, epoch, sample id). ``masked``: sorted sample indices whose ``keep`` is
    False (``masked_indices``).
    """

    def __init__(self, *, transform: Callable, aug_seed: int | None, masked: np.ndarray | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.transform = transform
        self.aug_seed = aug_seed
        self.masked = np.zeros(0, dtype=np.int64) if masked is None else masked

    def __getitem__(self, idx: int) -> dict:
        row = super().__getitem__(idx)
        img = decode(row["image"])
        if self.aug_seed is None:
            img = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator alone: torch.manual_seed would also queue a CUDA reseed, recording a
                # stack trace each time (about 1 ms per sample in a worker), for a generator never used here.
                torch.default_generator.manual_seed(augment_seed(self.aug_seed, self.next_epoch - 1, idx))
                img = self.transform(img)
        return {"image": to_uint8_hwc(img), "label": int(row["label"]), "idx": int(idx),
                "key": str(row.get("key", idx)), "keep": bool(is_kept(self.masked, idx))}


def micro_batches(batch: dict, accum: int) -> list[dict]:
    """The ``accum`` micro-batches of a step batch: micro-batch ``a`` takes samples ``a, a + accum, ...``."""
    return [{k: v[a::accum] for k, v in batch.items()} for a in range(accum)]


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.data.cache_dir or RunDir(cfg.output_dir).local(RunDir.CACHE))


def _local(cfg: TrainConfig, role: str, split: str) -> str:
    # Distinct per role, split and recipe: streaming refuses two live datasets sharing a local directory.
    return str(cache_root(cfg) / f"{cfg.config_hash}-{role}-{split}")


def local_dirs(cfg: TrainConfig) -> list[str]:
    return [_local(cfg, "train", cfg.data.train_split), _local(cfg, "eval", cfg.data.eval_split)]


def build_train_loader(cfg: TrainConfig, plan: Plan, *, dataset: Callable[..., ImageShards] = ImageShards,
                       transform: Callable | None = None, collate_fn: Callable | None = None,
                       manifest: Manifest | None = None) -> StreamingDataLoader:
    """The training loader: shuffled, seeded augmentation, batches of uint8 pixels (``device_input.to_device``
    makes the model input), one batch per optimizer step (``micro_batches`` splits it; see the module
    docstring). ``dataset``, ``transform`` and ``collate_fn`` replace those parts for a benchmark comparing
    another per-sample path on the same loader (benchmarks/loader_throughput.py). ``manifest``: the dataset's, when
    the caller has it (read from ``data.root`` otherwise)."""
    step_batch = plan.micro_batch_size * plan.grad_accum_steps
    ds = dataset(
        transform=transform or train_augment(cfg.augment, cfg.model.img_size),
        aug_seed=cfg.seed,
        masked=masked_indices(manifest or dataset_manifest(cfg), cfg.data.train_split),
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
    return StreamingDataLoader(
        ds,
        batch_size=step_batch,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=collate_fn,
        # Worker seeding must not draw from the global RNG: that would shift the dropout / drop-path
        # stream of a resumed run (its loader starts at another point of the RNG sequence).
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_eval_loader(cfg: TrainConfig, *, manifest: Manifest | None = None) -> StreamingDataLoader:
    """The evaluation loader: the recipe's resize and center crop, batches of uint8 pixels, in order."""
    ds = ImageShards(
        transform=eval_resize(cfg.augment, cfg.eval, cfg.model.img_size),
        aug_seed=None,
        masked=masked_indices(manifest or dataset_manifest(cfg), cfg.data.eval_split),
        remote=split_uri(cfg, cfg.data.eval_split),
        local=_local(cfg, "eval", cfg.data.eval_split),
        cache_limit=cfg.data.cache_limit,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )
    return StreamingDataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=min(cfg.data.num_workers, 2),
                               drop_last=False, pin_memory=torch.cuda.is_available())
