"""Evaluation metrics and preprocessing, against direct computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import coatnet
from pipeline.evaluate import MetricAccumulator, Preprocessing, load_run
from pipeline.train.config import AugmentConfig, EvalConfig, from_dict
from pipeline.train.transforms import eval_transform


def test_metrics_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=g) * 3
    labels = torch.randint(0, 7, (300,), generator=g)
    acc = MetricAccumulator(7)
    for i in range(0, 300, 64):  # batch by batch
        acc.update(logits[i:i + 64], labels[i:i + 64])
    s = acc.summary()
    pred = logits.argmax(1)
    assert s["num_samples"] == 300
    assert s["top1"] == pytest.approx((pred == labels).float().mean().item())
    top5 = logits.topk(5, 1).indices
    assert s["top5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    assert s["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    for c in range(7):
        m = labels == c
        assert s["per_class_accuracy"][c] == pytest.approx((pred[m] == c).float().mean().item())
    # ECE: 15 equal-width bins of the top-1 confidence, weighted |accuracy - confidence|.
    conf = logits.softmax(1).max(1).values.numpy()
    hit = (pred == labels).numpy()
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(hit[bins == b].mean() - conf[bins == b].mean()) * (bins == b).sum() for b in np.unique(bins)) / 300
    assert s["ece"] == pytest.approx(ece, abs=1e-6)
    topk, confidence = acc.predictions()
    assert topk.shape == (300, 5) and np.array_equal(topk[:, 0], pred.numpy())
    assert np.allclose(confidence, conf, atol=1e-6)


def test_perfect_and_empty():
    acc = MetricAccumulator(3)
    acc.update(torch.eye(3) * 50, torch.arange(3))
    s = acc.summary()
    assert s["top1"] == 1.0 and s["ece"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no samples"):
        MetricAccumulator(3).summary()
    with pytest.raises(ValueError, match="labels outside"):
        MetricAccumulator(3).update(torch.zeros(1, 3), torch.tensor([5]))


@pytest.mark.parametrize("center_crop", [False, True])
def test_preprocessing_equals_the_trainers_eval_transform(center_crop):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    aug = AugmentConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ev = EvalConfig(center_crop=center_crop, crop_pct=0.9)
    pre = Preprocessing(img_size=48, mean=aug.mean, std=aug.std, interpolation=aug.interpolation,
                        center_crop=center_crop, crop_pct=0.9)
    theirs = eval_transform(aug, ev, 48)(img.convert("RGB"))
    ours = pre.decode(buf.getvalue())
    assert ours.shape == (3, 48, 48) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert Preprocessing.from_dict(pre.to_dict()) == pre


def test_a_run_directory_brings_its_preprocessing(tmp_path):
    import json

    from safetensors.torch import save_file

    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model_config.json").write_text(json.dumps(
        {"name": "coatnet_pico", "num_classes": 10, "img_size": 32, "config": model.config.to_dict()}))
    cfg = from_dict({"data": {"root": "x"}, "model": {"name": "coatnet_pico", "img_size": 32},
                     "augment": {"mean": [0.5] * 3, "std": [0.5] * 3}, "eval": {"crop_pct": 0.9}})
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    src = load_run(str(tmp_path))  # a pretraining run: the trainer's eval transform
    assert list(src.models) == ["raw"] and src.num_classes == 10
    assert src.preprocessing == Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", True, 0.9)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src.models["raw"](x), model.eval()(x))
    (tmp_path / "preprocessing.json").write_text(json.dumps(Preprocessing(48).to_dict()))
    assert load_run(str(tmp_path)).preprocessing == Preprocessing(48)  # the fine-tuning stage's record wins
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_run(str(tmp_path / "nowhere"))
