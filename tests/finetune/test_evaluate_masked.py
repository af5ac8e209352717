"""Evaluation skips the masked samples of the split (duplicates the sharding job found after writing them): each
image is scored once, and the report counts ``samples - len(masked)``."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

import coatnet
from pipeline.data.manifest import load_manifest
from pipeline.evaluate import evaluate


def _run_dir(path):
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=4, img_size=32)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "model_config.json").write_text(json.dumps({"name": "coatnet_pico", "num_classes": 4, "img_size": 32}))
    return path


def test_evaluation_scores_each_image_once(masked_shards, tmp_path):
    run = _run_dir(tmp_path / "run")
    manifest = load_manifest(masked_shards)
    split = manifest["splits"]["train"]
    masked_keys = {q["key"] for q in manifest["quarantined"] if "still in the train shards" in q["reason"]}
    assert len(masked_keys) == len(split["masked"]) > 0
    report = evaluate(str(run), masked_shards, split="train", weights=("raw",), batch_size=32, num_workers=0,
                      out_dir=tmp_path / "eval", log_mlflow=False, progress=False)
    assert report["weights"]["raw"]["num_samples"] == split["samples"] - len(split["masked"])
    keys = np.load(tmp_path / "eval" / "predictions_raw.npz")["keys"].tolist()
    assert len(keys) == len(set(keys)) == split["samples"] - len(split["masked"])
    assert not masked_keys & set(keys)
    # max_samples counts the scored samples.
    capped = evaluate(str(run), masked_shards, split="train", weights=("raw",), batch_size=32, num_workers=0,
                      max_samples=40, out_dir=tmp_path / "eval40", log_mlflow=False, progress=False)
    assert capped["weights"]["raw"]["num_samples"] == 40
