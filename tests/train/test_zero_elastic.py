"""Elastic resume end to end: ZeRO-3 with the sharded EMA, checkpointed on 2 ranks, resumed on 1, then on 2
again (each time through DeepSpeed's universal checkpoint), against a run never interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import read_losses, read_samples, tiny

import coatnet
from pipeline.train import launch

pytestmark = [pytest.mark.slow]

# The small minival split as training data (8 steps cross epoch boundaries), global batch 16 of micro 8:
# accumulation 1 on 2 ranks, 2 on 1 rank. No drop-path: its masks are drawn per rank.
ELASTIC = ["data.train_split=minival", "data.eval_split=minival", "train.global_batch_size=16",
           "train.micro_batch_size=8", "eval.max_samples=32", "deepspeed.zero_stage=3", "train.max_steps=8",
           "checkpoint.interval_steps=100", "checkpoint.keep_last=3", "train.record_samples=true", "model.drop_path_rate=0.0",
           "ema.decay=0.9", "augment.randaugment.num_ops=2", "augment.randaugment.magnitude=9"]


@pytest.mark.timeout(900)
def test_checkpoint_of_2_ranks_resumes_on_1_then_on_2_like_an_uninterrupted_run(digits_shards, recipe, tmp_path):
    ref = launch(recipe, tiny(digits_shards, tmp_path / "ref", *ELASTIC), launcher="local", nproc=2)
    assert ref.finished and ref.step == 8
    out = tmp_path / "elastic"
    mine = tiny(digits_shards, out, *ELASTIC)
    a = launch(recipe, [*mine, "train.stop_after_steps=3"], launcher="local", nproc=2, resume="none")
    b = launch(recipe, [*mine, "train.stop_after_steps=3"], launcher="local", nproc=1, resume="auto")
    c = launch(recipe, mine, launcher="local", nproc=2, resume="auto")
    assert (a.step, b.step, c.step) == (3, 6, 8) and c.finished
    # Each change of world size went through a universal checkpoint, converted once next to its checkpoint.
    ckpts = Path(c.checkpoint_dir)
    for step, source in ((3, 2), (6, 1)):
        marker = json.loads((ckpts / f"step_{step:08d}" / "universal" / "complete.json").read_text())
        assert (marker["step"], marker["source_world_size"]) == (step, source)
    # The same samples at every step, the same loss curve, the same weights and EMA.
    assert read_samples(out) == read_samples(ref.output_dir)
    want, got = read_losses(ref.output_dir), read_losses(out)
    assert set(want) <= set(got)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), (step, got[step], want[step])
    # Parameters, that is: BatchNorm's running statistics are rank 0's, which saw half the micro-batches on 2
    # ranks and all of them on 1 (they never enter the training loss).
    params = {n for n, _ in coatnet.create_model("coatnet_pico", num_classes=20, img_size=32,
                                                 device="meta").named_parameters()}
    for mine_file, ref_file in ((c.weights, ref.weights), (c.ema_weights, ref.ema_weights)):
        x, y = load_file(mine_file), load_file(ref_file)
        assert x.keys() == y.keys() and params <= y.keys()
        for k in sorted(params):
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)
