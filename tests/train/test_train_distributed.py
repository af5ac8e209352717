"""2-rank DeepSpeed training on CPU (gloo) from shards on the local S3 server: every launcher,
ZeRO-2 and ZeRO-3, sample-exact resume, export, the Ray Train launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import read_losses, read_samples, tiny

import coatnet
from pipeline import storage
from pipeline.data import load_manifest
from pipeline.train import LaunchError, launch
from pipeline.train.export import consolidate
from pipeline.train.launcher import RayOptions

pytestmark = [pytest.mark.slow]

# The small minival split as training data, so that 8 steps cross epoch boundaries.
SMALL = ["data.train_split=minival", "data.eval_split=minival", "train.global_batch_size=16",
         "train.micro_batch_size=8", "eval.max_samples=32"]


@pytest.mark.timeout(420)
def test_zero2_two_ranks_from_s3_trains_checkpoints_and_exports(digits_shards, recipe, tmp_path, monkeypatch):
    out = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    # A NaN injected at step 3 is skipped (budget 1), logged, and training goes on.
    monkeypatch.setenv("COATNET_CALLBACKS", "pipeline.train.faults:NonFiniteLoss(step=3)")
    result = launch(recipe, tiny(digits_shards, out, "deepspeed.zero_stage=2", "train.max_steps=24",
                                 "checkpoint.interval_steps=10", "checkpoint.keep_last=2",
                                 "checkpoint.upload_uri=" + digits_shards.rsplit("/", 2)[0] + "/ckpt-z2",
                                 "train.max_nonfinite_skips=1", "ema.decay=0.9", "eval.interval_steps=12",
                                 "logging.mlflow=true", f"logging.mlflow_tracking_uri=sqlite:///{db}"),
                    launcher="local", nproc=2)
    assert result.finished and result.step == 24
    losses = read_losses(out)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.7 * first, losses
    # Checkpoints: interval + end, last 2 kept, latest marker names the final one.
    ckpts = Path(result.checkpoint_dir)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000020", "step_00000024"]
    assert (ckpts / "latest").read_text() == "step_00000024"
    assert Path(result.last_checkpoint) == ckpts / "step_00000024"
    # The DeepSpeed shards of both ranks are consolidated into one fp32 state dict that loads strictly.
    state = consolidate(result.last_checkpoint)
    model = coatnet.create_model("coatnet_pico", num_classes=20, img_size=32)
    model.load_state_dict(state, strict=True)
    exported = load_file(result.weights)
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())
    ema = load_file(result.ema_weights)
    model.load_state_dict(ema, strict=True)
    assert not all(torch.equal(ema[k], state[k]) for k in state if state[k].is_floating_point())
    cfg = json.loads(Path(result.model_config).read_text())
    assert (cfg["name"], cfg["num_classes"], cfg["img_size"]) == ("coatnet_pico", 20, 32)
    # Metrics: throughput, FLOPs, data wait, eval, a curve, and the MLflow run.
    m = result.final_metrics
    assert m["images_per_s"] > 0 and m["tflops"] > 0 and 0 <= m["data_wait_frac"] <= 1

    minival = load_manifest(digits_shards)["splits"]["minival"]["samples"]
    # Each sample once, although streaming pads the ranks' partitions with repeats.
    assert 0 <= m["eval_top1"] <= 1 and m["eval_samples"] == min(64, minival)
    assert Path(result.curve_png).stat().st_size > 1000
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{db}").get_run(result.mlflow_run_id)
    assert run.data.metrics["loss"] == pytest.approx(last, rel=1e-6)
    assert run.info.status == "FINISHED"
    # The object-storage copy holds the same complete checkpoint.

    remote = digits_shards.rsplit("/", 2)[0] + "/ckpt-z2"
    assert storage.read_text(storage.join(remote, "latest")) == "step_00000024"
    assert storage.exists(storage.join(remote, "step_00000024", "complete.json"))


@pytest.fixture(scope="module")
def reference_run(digits_shards, tmp_path_factory):
    """ZeRO-3, 2 ranks under torchrun, 8 steps, never interrupted: the trajectory the others must match."""
    out = tmp_path_factory.mktemp("ref") / "run"
    recipe = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"
    overrides = tiny(digits_shards, out, *SMALL, "deepspeed.zero_stage=3", "train.max_steps=8",
                     "checkpoint.interval_steps=4", "train.record_samples=true", "augment.randaugment.num_ops=2",
                     "augment.randaugment.magnitude=9", "model.drop_path_rate=0.1")
    result = launch(recipe, overrides, launcher="torchrun", nproc=2)
    return recipe, overrides, result


@pytest.mark.timeout(480)
def test_crash_and_resume_is_sample_exact(reference_run, tmp_path, monkeypatch):
    """Stopped by a non-finite loss at step 5 (checkpoint at 4), resumed: same weights, losses and samples."""
    recipe, overrides, ref = reference_run
    ref_losses, ref_samples = read_losses(ref.output_dir), read_samples(ref.output_dir)
    assert ref.finished and ref_losses[8] < ref_losses[2]
    out = tmp_path / "run"
    mine = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={out}"]
    monkeypatch.setenv("COATNET_CALLBACKS", "pipeline.train.faults:NonFiniteLoss(step=5)")
    with pytest.raises(LaunchError, match=r"non-finite loss .* at step 5 \(epoch 1\)"):
        launch(recipe, [*mine, "train.max_nonfinite_skips=0"], launcher="local", nproc=2, resume="none")
    # What is needed to inspect it was saved; the resumable checkpoint is still step 4.
    assert sorted(p.name for p in Path(out, "nonfinite").iterdir()) == \
        ["step00000005_rank00000.pt", "step00000005_rank00001.pt"]
    assert Path(out, "checkpoints", "nonfinite_step_00000005", "complete.json").is_file()
    assert Path(out, "checkpoints", "latest").read_text() == "step_00000004"
    monkeypatch.delenv("COATNET_CALLBACKS")
    resumed = launch(recipe, mine, launcher="deepspeed", nproc=2, resume="auto")
    assert resumed.finished and resumed.step == 8
    # Same weights and the same loss curve as the run never stopped.
    a, b = load_file(ref.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    got = read_losses(out)
    assert got.keys() == ref_losses.keys()
    for step in ref_losses:
        assert got[step] == pytest.approx(ref_losses[step], rel=1e-4, abs=1e-5), step
    # The same samples at every step; within an epoch none twice and none skipped.
    samples = read_samples(out)
    assert samples == ref_samples
    spe = json.loads(Path(out, "plan.json").read_text())["steps_per_epoch"]
    assert spe < 8  # the run crossed epoch boundaries, and the crash (step 5) fell inside an epoch
    by_epoch: dict[int, list[str]] = {}
    for step, keys in samples.items():
        by_epoch.setdefault(step // spe, []).extend(keys)
    for epoch, keys in by_epoch.items():
        steps_in_epoch = min(spe, 8 - epoch * spe)  # the last one is cut short by max_steps
        assert len(keys) == len(set(keys)) == 16 * steps_in_epoch


@pytest.mark.timeout(480)
def test_ray_train_launcher_restarts_a_lost_worker_and_matches_reference(reference_run, tmp_path, monkeypatch):
    """Ray Train, 2 workers on a local 2-CPU Ray: rank 1 dies after step 6; FailureConfig restarts the
    job, which resumes from the step-4 checkpoint and ends where the uninterrupted torchrun run ended."""
    recipe, overrides, ref = reference_run
    out = tmp_path / "run"
    mine = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={out}"]

    monkeypatch.setenv("COATNET_CALLBACKS", "pipeline.train.faults:LoseWorker(step=6)")
    result = launch(recipe, mine, launcher="ray", nproc=2,
                    ray=RayOptions(num_cpus=2, cpus_per_worker=1, max_failures=1), resume="none")
    # "none" held for the first attempt only: the restart continued from the checkpoint, not from step 0.
    assert Path(out, ".fault-exit-done").exists()  # the worker really was lost
    assert result.finished and result.step == 8
    a, b = load_file(ref.weights), load_file(result.weights)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert read_samples(out) == read_samples(ref.output_dir)
