"""The uint8 loader path: workers send uint8 pixels, ``device_input.to_device`` scales, normalises and mixes.

Its batches must equal, bit for bit, what the float path before it produced (workers running torchvision's
ToDtype/Normalize and MixUp/CutMix in the collate, seeded with ``torch.manual_seed``), sample by sample; the
evaluation batches must equal the registered model's preprocessing; and the augmentation must not depend on
the number of workers or on a resume.
"""

from __future__ import annotations

import gc
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from pipeline.evaluate.preprocessing import Preprocessing
from pipeline.train.config import AugmentConfig, EvalConfig, load_config, make_plan
from pipeline.train.data import build_eval_loader, build_train_loader, decode
from pipeline.train.device_input import mix_batch, normalize, to_device
from pipeline.train.streaming_shm import dataset_prefix, release_deleted_dataset
from pipeline.train.transforms import (
    augment_seed,
    batch_mix,
    eval_resize,
    eval_transform,
    to_uint8_hwc,
    train_transform,
)

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"
CLASSES = 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jpeg(rng: np.random.Generator) -> bytes:
    h, w = (int(v) for v in rng.integers(36, 72, 2))
    noise = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(noise).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """A dataset root as the sharding stage lays it out (manifest, one MDS dataset per split) of small JPEGs."""
    from streaming import MDSWriter

    root = tmp_path_factory.mktemp("jpeg-shards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("minival", 12)):
        with MDSWriter(out=str(root / split), columns={"image": "bytes", "label": "int", "key": "str"}) as w:
            for i in range(n):
                w.write({"image": _jpeg(rng), "label": i % CLASSES, "key": f"{split}/{i}"})
    (root / "manifest.json").write_text(json.dumps({"num_classes": CLASSES}))
    return root


def _config(root: Path, out: Path, *extra: str):
    overrides = [
        f"data.root={root}", f"output_dir={out}", f"data.cache_dir={out / 'cache'}", "data.num_workers=0",
        "data.clean_stale_shared_memory=false", "model.img_size=32", "train.global_batch_size=8",
        "train.micro_batch_size=8", "eval.batch_size=8", "logging.mlflow=false", "schedule.warmup_epochs=0",
        "augment.hflip=0.5", "augment.randaugment={num_ops: 2, magnitude: 15}", "augment.mixup_alpha=0.8",
        "augment.cutmix_alpha=1.0", "augment.crop_scale=[0.08, 1.0]", f"augment.mean={list(MEAN)}",
        f"augment.std={list(STD)}", *extra,
    ]
    cfg = load_config(RECIPE, overrides, check_data=False)
    return cfg, make_plan(cfg, 1, with_counts=False)


def _drain(loader, limit: int | None = None) -> list[dict]:
    batches = []
    for b in loader:
        batches.append(b)
        if limit is not None and len(batches) == limit:
            break
    return batches


def _close(loader) -> None:
    prefix = dataset_prefix(loader.dataset)
    del loader
    gc.collect()
    release_deleted_dataset(prefix)


def _float_path_of_before(cfg, dataset, batch: dict, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the workers sent before: torchvision's float transform per sample, seeded by torch.manual_seed,
    default collation, then MixUp/CutMix in the collate, seeded by the batch's first sample ids."""
    rows = []
    for idx in batch["idx"].tolist():
        img = Image.open(io.BytesIO(dataset.get_item(idx)["image"])).convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed(cfg.seed, epoch, idx))
            rows.append({"image": train_transform(cfg.augment, cfg.model.img_size)(img), "label": int(
                dataset.get_item(idx)["label"]), "idx": idx})
    before = default_collate(rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(augment_seed(cfg.seed, *before["idx"].tolist()[:8]))
        return batch_mix(cfg.augment, CLASSES)(before["image"], before["label"])


def test_train_batches_equal_the_float_path_of_before(jpeg_root, tmp_path):
    cfg, plan = _config(jpeg_root, tmp_path)
    loader = build_train_loader(cfg, plan)
    try:
        batches = _drain(loader)
        assert len(batches) == 40 // 8
        for batch in batches:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 32, 32, 3)
            want_x, want_y = _float_path_of_before(cfg, loader.dataset, batch, epoch=0)
            x, y = to_device(batch, "cpu", torch.float32, cfg, mix_classes=plan.num_classes)
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
            x16, _ = to_device(batch, "cpu", torch.bfloat16, cfg, mix_classes=plan.num_classes)
            assert torch.equal(x16, want_x.to(torch.bfloat16))
    finally:
        _close(loader)


def test_augmentation_is_the_same_for_any_worker_count_and_across_a_resume(jpeg_root, tmp_path):
    cfg0, plan = _config(jpeg_root, tmp_path / "w0")
    loader = build_train_loader(cfg0, plan)
    ref = _drain(loader)
    _close(loader)
    cfg2, _ = _config(jpeg_root, tmp_path / "w2", "data.num_workers=2")
    loader = build_train_loader(cfg2, plan)
    got = _drain(loader)
    _close(loader)
    assert [b["key"] for b in got] == [b["key"] for b in ref]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, ref))
    # Interrupted after two batches, resumed by a new loader from the saved state: the rest is the same.
    cfg1, _ = _config(jpeg_root, tmp_path / "w1", "data.num_workers=1")
    loader = build_train_loader(cfg1, plan)
    _drain(loader, 2)
    state = loader.state_dict()
    _close(loader)
    loader = build_train_loader(cfg1, plan)
    loader.load_state_dict(state)
    rest = _drain(loader)
    _close(loader)
    assert [b["key"] for b in rest] == [b["key"] for b in ref[2:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, ref[2:]))


def test_eval_batches_equal_the_registered_models_preprocessing(jpeg_root, tmp_path):
    cfg, _ = _config(jpeg_root, tmp_path, "eval.crop_pct=0.875")
    pre = Preprocessing.from_train_config(cfg)
    loader = build_eval_loader(cfg)
    try:
        n = 0
        for batch in loader:
            x, y = to_device(batch, "cpu", torch.float32, cfg)
            want = torch.stack([pre.decode(loader.dataset.get_item(i)["image"]) for i in batch["idx"].tolist()])
            assert torch.equal(x, want) and torch.equal(y, batch["label"])
            n += len(y)
        assert n == 12
    finally:
        _close(loader)


@pytest.mark.parametrize("center_crop", [False, True])
def test_device_normalisation_equals_torchvisions_on_the_cpu(center_crop):
    rng = np.random.default_rng(1)
    aug, ev = AugmentConfig(mean=MEAN, std=STD), EvalConfig(center_crop=center_crop, crop_pct=0.9)
    imgs = [decode(_jpeg(rng)) for _ in range(3)]
    want = torch.stack([eval_transform(aug, ev, 40)(im) for im in imgs])
    pixels = torch.stack([to_uint8_hwc(eval_resize(aug, ev, 40)(im)) for im in imgs])
    got = normalize(pixels, "cpu", mean=MEAN, std=STD)
    assert got.dtype == torch.float32 and got.shape == (3, 3, 40, 40)
    assert torch.equal(got, want)
    assert torch.equal(normalize(pixels, "cpu", mean=MEAN, std=STD, channels_last=False), want)
    with pytest.raises(TypeError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        normalize(want, "cpu", mean=MEAN, std=STD)


def test_mixing_is_seeded_by_the_batch_and_leaves_the_global_generator_alone():
    mix = batch_mix(AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0), num_classes=CLASSES)
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4) % CLASSES
    state = torch.get_rng_state()
    a, b = mix_batch(x, y, torch.arange(4), mix, 0), mix_batch(x, y, torch.arange(4), mix, 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (4, CLASSES) and torch.allclose(a[1].sum(1), torch.ones(4))
    others = [mix_batch(x, y, torch.arange(4) + k, mix, 0)[1] for k in range(1, 4)]
    assert any(not torch.equal(o, a[1]) for o in others)  # other samples, other draws
    assert batch_mix(AugmentConfig(), CLASSES) is None
