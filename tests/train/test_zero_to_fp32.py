"""A ZeRO-3 checkpoint of the trainer opens with DeepSpeed's own `zero_to_fp32.py`, run as users run it.

DeepSpeed copies the script into the checkpoints directory; run with the checkpoints directory (its `latest`
names the tag) it writes a safetensors state dict, which must load strictly into the run's variant built by
`coatnet.create_model` and equal the trainer's own export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny

import coatnet
from pipeline.train import launch

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(420)
def test_zero3_checkpoint_converts_with_deepspeeds_script_and_loads_strictly(digits_shards, recipe, tmp_path):
    out = tmp_path / "run"
    result = launch(recipe, tiny(digits_shards, out, "deepspeed.zero_stage=3", "train.max_steps=2",
                                 "eval.interval_steps=0", "train.global_batch_size=16", "train.micro_batch_size=8"),
                    launcher="local", nproc=2)
    assert result.finished and result.step == 2
    ckpts = out / "checkpoints"
    script = ckpts / "zero_to_fp32.py"
    assert script.is_file(), sorted(p.name for p in ckpts.iterdir())
    assert (ckpts / "latest").read_text().strip() == Path(result.last_checkpoint).name

    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run([sys.executable, str(script), str(ckpts), str(tmp_path / "fp32"), "--safe_serialization"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "fp32").glob("*.safetensors"))
    assert files, sorted(p.name for p in (tmp_path / "fp32").iterdir())
    sd = {k: v for f in files for k, v in load_file(str(f)).items()}

    run = json.loads((out / "model_config.json").read_text())
    model = coatnet.create_model(run["name"], num_classes=run["num_classes"], img_size=run["img_size"],
                                 **run["overrides"])
    assert model.load_state_dict(sd, strict=True)  # no missing or unexpected keys, every shape right
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    exported = load_file(str(out / "model.safetensors"))
    assert sd.keys() == exported.keys()
    for k, v in exported.items():
        assert torch.equal(sd[k], v), k
