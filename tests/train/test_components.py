"""The trainer's parts on their own: parameter groups, schedules, losses, EMA, transforms,
the checkpoint manager's resume rules, and the CLI's flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coatnet
from pipeline.cli import build_parser, main
from pipeline.train.checkpoint import COMPLETE, CheckpointManager, ResumeError
from pipeline.train.config import (
    AugmentConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RandAugmentConfig,
    ScheduleConfig,
    dataset_root,
)
from pipeline.train.loss import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from pipeline.train.metrics import MetricsSink
from pipeline.train.optim import lr_at, param_groups
from pipeline.train.streaming_shm import registered_prefixes, release_stale_shared_memory
from pipeline.train.transforms import eval_transform, train_transform


def test_param_groups_exempt_norms_biases_and_relative_position_tables():
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=32)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(list(model.parameters()))
    no_decay_names = {names[i] for i in ids[1]}
    tables = [n for n in names.values() if "table" in n]
    assert tables and set(tables) <= no_decay_names
    assert all(n.endswith("bias") or "norm" in n or "table" in n or "bn" in n for n in no_decay_names), no_decay_names
    assert all(p.ndim > 1 for p in decay["params"])


def test_schedules():
    opt = OptimConfig(lr=1e-3, min_lr=1e-5)
    cos, lin, const = ScheduleConfig("cosine"), ScheduleConfig("linear"), ScheduleConfig("constant")

    def lr(step, sched, warm=10):
        return lr_at(step, total_steps=110, warmup_steps=warm, optim=opt, schedule=sched)

    assert lr(0, cos) == pytest.approx(1e-4) and lr(9, cos) == pytest.approx(1e-3)  # linear warm-up
    assert lr(10, cos) == pytest.approx(1e-3) and lr(110, cos) == pytest.approx(1e-5)
    assert lr(60, cos) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # cosine midpoint
    assert lr(60, lin) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr(35, lin) == pytest.approx(1e-5 + 0.75 * (1e-3 - 1e-5))
    assert lr(0, const, warm=0) == lr(109, const, warm=0) == 1e-3  # fine-tuning rows: constant, no warm-up
    values = [lr(s, cos) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_softmax_loss_with_smoothing_and_soft_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = SoftmaxCrossEntropy(0.1)
    assert loss(logits, y) == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-6)
    assert loss(logits, F.one_hot(y, 5).float()) == pytest.approx(loss(logits, y).item(), rel=1e-6)


def test_sigmoid_loss_sums_over_classes():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 7), torch.tensor([1, 2, 3, 6])
    eps = 1e-4
    target = F.one_hot(y, 7).float() * (1 - eps) + eps / 7
    want = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 4
    assert SigmoidBinaryCrossEntropy(eps)(logits, y) == pytest.approx(want.item(), rel=1e-6)


def test_transforms_shapes_and_determinism():
    img = Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())
    aug = AugmentConfig(randaugment=RandAugmentConfig(2, 9))
    t = train_transform(aug, 32)
    torch.manual_seed(1)
    a = t(img)
    torch.manual_seed(1)
    assert a.shape == (3, 32, 32) and torch.equal(a, t(img))
    e = eval_transform(aug, EvalConfig(center_crop=True, crop_pct=0.875), 32)(img)
    assert e.shape == (3, 32, 32)
    assert eval_transform(aug, EvalConfig(center_crop=False), 32)(img).shape == (3, 32, 32)


class _NoEngine:
    """The manager must refuse before it ever touches the engine."""

    def load_universal_checkpoint(self) -> bool:
        return False

    def load_checkpoint(self, *a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("engine.load_checkpoint called")


def _fake_checkpoint(root: Path, step: int, config_hash: str = "abc", world: int = 2, complete: bool = True) -> None:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()  # partitioned optimizer state
    if complete:
        (d / COMPLETE).write_text(json.dumps({"tag": d.name, "step": step, "config_hash": config_hash,
                                              "world_size": world}))


def test_resume_picks_newest_complete_and_refuses_other_recipes(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 10)
    _fake_checkpoint(root, 20)
    _fake_checkpoint(root, 30, complete=False)  # interrupted while saving: never resumed from
    mgr = CheckpointManager(root, keep_last=2, upload_uri=None, rank=0, local_rank=0)
    found = mgr.find("auto")
    assert (found.path, found.step, found.world_size, found.config_hash) == (root / "step_00000020", 20, 2, "abc")
    assert mgr.find("none") is None
    assert mgr.find(str(root / "step_00000010")).path == root / "step_00000010"
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        mgr.find(str(root / "step_00000030"))
    with pytest.raises(ResumeError, match="different recipe"):
        mgr.load(_NoEngine(), found, config_hash="other", world_size=2, force=False)
    # Another world size goes through a universal checkpoint, for which the engine must have been built.
    assert found.needs_universal(4) and not found.needs_universal(2)
    with pytest.raises(ResumeError, match="written by 2 ranks, this run has 4.*load_universal"):
        mgr.load(_NoEngine(), found, config_hash="abc", world_size=4, force=False)
    assert CheckpointManager(tmp_path / "empty", keep_last=1, upload_uri=None, rank=0, local_rank=0).find("auto") is None


def test_cli_flags_parse_for_every_launcher():
    args = build_parser().parse_args([
        "pretrain", "--config", "configs/pretrain/demo.yaml", "train.epochs=2", "deepspeed.zero_stage=3",
        "--resume", "none", "--launcher", "ray", "--nproc", "2", "--num-workers", "4", "--gpus-per-worker", "1",
        "--cpus-per-worker", "8", "--ray-address", "ray://head:10001", "--max-failures", "3", "--force-resume",
    ])
    assert args.overrides == ["train.epochs=2", "deepspeed.zero_stage=3"]
    assert (args.launcher, args.nproc, args.num_workers, args.gpus_per_worker, args.ray_address) == \
        ("ray", 2, 4, 1.0, "ray://head:10001")
    assert args.resume == "none" and args.force_resume and not args.dry_run and callable(args.func)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--config", "x.yaml", "--launcher", "slurm"])


def test_cli_dry_run_prints_the_plan(digits_shards, capsys):
    rc = main(["pretrain", "--config", "configs/pretrain/demo.yaml", f"data.root={digits_shards}", "--nproc", "2",
               "--dry-run", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["plan"]
    assert (plan["world_size"], plan["micro_batch_size"], plan["grad_accum_steps"]) == (2, 32, 1)
    assert plan["num_classes"] == 20 and plan["params"] > 1e5 and plan["macs_per_image"] > 1e6
    assert plan["steps_per_epoch"] == plan["train_samples"] // 64
    assert plan["total_steps"] == math.ceil(3 * plan["steps_per_epoch"])
    assert plan["deepspeed"]["zero_optimization"]["stage"] == 2
    assert not Path(out["resolved"]["output_dir"], "checkpoints").exists()  # nothing ran
    rc = main(["pretrain", "--config", "configs/pretrain/demo.yaml", f"data.root={digits_shards}", "--nproc", "3",
               "--dry-run"])
    assert rc == 2
    assert "train.global_batch_size" in capsys.readouterr().err


def test_stale_shared_memory_of_a_crashed_run_is_released(digits_shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from streaming import StreamingDataset

    remote, local = dataset_root(digits_shards) + "/minival", str(tmp_path / "cache-minival")
    # A process killed hard (SIGKILL to its whole group: it and its resource tracker, as the OOM killer
    # or a lost worker would) leaves its shared memory behind.
    crash = ("import sys, time\nfrom streaming import StreamingDataset\n"
             "ds = StreamingDataset(remote=sys.argv[1], local=sys.argv[2], batch_size=4)\nprint('ready', flush=True)\n"
             "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", crash, remote, local], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert len(registered_prefixes([local])) == 1
    assert release_stale_shared_memory([str(tmp_path / "someone-else")]) == 0
    assert release_stale_shared_memory([local]) == 1
    assert registered_prefixes([local]) == []
    ds = StreamingDataset(remote=remote, local=local, batch_size=4)
    assert len(ds) > 0


def test_metrics_sink_follows_the_tracking_env_and_logs_no_credentials(tmp_path, monkeypatch):
    import mlflow

    db = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)  # the recipe leaves the URI unset: the environment decides
    key = "AKIA" + "ABCDEFGHIJKLMNOP"
    sink = MetricsSink(tmp_path / "out", enabled=True, mlflow_cfg=LoggingConfig(mlflow_experiment="sink-test"),
                       run_name="sink", run_id=None,
                       params={"checkpoint.upload_uri": f"https://{key}:pw@store.example/ckpt", "optim.lr": 0.1})
    sink.close()
    params = mlflow.MlflowClient(db).get_run(sink.run_id).data.params
    assert params["optim.lr"] == "0.1"
    assert key not in params["checkpoint.upload_uri"] and "pw" not in params["checkpoint.upload_uri"]
