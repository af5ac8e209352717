"""A dry run sizes a recipe before its data or credentials exist: the whole plan, and warnings for what it
could not check (no training, nothing written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.train.known_datasets import KNOWN_DATASETS

REPO = Path(__file__).resolve().parents[2]
IN21K = str(REPO / "configs/pretrain/coatnet_3_in21k.yaml")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No AWS credentials anywhere boto3 looks (environment, shared files, instance metadata), real AWS endpoint."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _run(capsys, *argv: str) -> tuple[int, dict, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "--json" in argv else {"text": out}), err


def test_21k_recipe_without_credentials_prints_the_whole_plan(no_credentials, capsys, tmp_path):
    rc, out, err = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", "--nproc", "8", "--json",
                        f"output_dir={tmp_path / 'run'}")
    assert rc == 0, err
    p = out["plan"]
    samples = KNOWN_DATASETS["imagenet21k-winter21"].train_samples(0.02)
    assert (p["world_size"], p["micro_batch_size"], p["grad_accum_steps"]) == (8, 64, 8)
    assert (p["train_samples"], p["steps_per_epoch"]) == (samples, samples // 4096)
    assert p["total_steps"] == math.ceil(90 * p["steps_per_epoch"]) and p["warmup_steps"] == round(5 * p["steps_per_epoch"])
    assert p["num_classes"] == 21841 and p["params"] > 150e6 and p["train_gflops_per_image"] > 150
    assert 10 < p["memory_gib_per_rank"] < 141
    assert "13,153,500 images" in p["samples_from"] and "imagenet21k-winter21" in p["classes_from"]
    warnings = out["warnings"]
    assert any(w.startswith("credentials: no AWS credentials") for w in warnings)
    assert any("NoCredentialsError" in w and "data.num_samples" not in w for w in warnings)
    assert err.count("WARNING: ") == len(warnings) == 2
    assert not (tmp_path / "run").exists()
    # The implementation choices and why (this machine has no GPU): nothing falls back silently.
    assert p["optimizer"] == {"impl": "torch", "reason": "CPU: no fused kernel exists there"}
    assert p["deepspeed"]["optimizer"]["params"]["torch_adam"] is True and "fused" not in p["deepspeed"]["optimizer"]["params"]
    assert p["compile"]["enabled"] is False and p["compile"]["reason"].startswith("CPU")
    # The same as text: every figure of the plan, the warnings after it.
    rc, out, err = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", "--nproc", "8")
    assert rc == 0 and "WARNING: credentials" in err
    for line in ("world      8 ranks", "batch      global 4096 = micro 64 x accumulation 8 x 8 ranks",
                 f"over {samples} samples", "training FLOPs/image", "GiB per rank",
                 "optimizer  AdamW torch: CPU", "compile    off: CPU"):
        assert line in out["text"]


def test_explicit_optimizer_and_compile_choices_are_taken_and_said(no_credentials, capsys):
    rc, out, err = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", "--nproc", "8", "--json",
                        "optim.impl=torch_fused", "model.compile=true")
    assert rc == 0, err
    p = out["plan"]
    assert p["optimizer"] == {"impl": "torch_fused", "reason": "optim.impl in the recipe"}
    assert p["deepspeed"]["optimizer"]["params"]["fused"] is True
    assert p["compile"] == {"enabled": True, "reason": "model.compile in the recipe"}


def test_one_rank_zero2_is_flagged_with_its_cost(no_credentials, capsys):
    rc, out, _ = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", "--nproc", "1", "--json")
    assert rc == 0 and any(w.startswith("deepspeed: ZeRO-2 on one rank") for w in out["warnings"])
    rc, out, _ = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", "--nproc", "1", "--json",
                      "deepspeed.zero_stage=0")
    assert rc == 0 and not any(w.startswith("deepspeed:") for w in out["warnings"])


def test_unreadable_bucket_falls_back_to_data_num_samples(s3_endpoint, capsys):
    root = "s3://no-such-bucket-for-dry-runs/imagenet21k"
    rc, out, err = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", "--nproc", "4", "--json",
                        f"data.root={root}", "data.num_samples=1000000", "model.num_classes=1000")
    assert rc == 0, err
    assert (out["plan"]["train_samples"], out["plan"]["steps_per_epoch"]) == (1_000_000, 244)
    assert out["plan"]["samples_from"] == "data.num_samples" and out["plan"]["num_classes"] == 1000
    assert [w for w in out["warnings"] if w.startswith("shards not checked: data.root:") and root in w]
    assert not [w for w in out["warnings"] if w.startswith("credentials")]  # the test server's are set
    # Without a size to fall back on, the dry run says which key to set.
    rc, _, err = _run(capsys, "pretrain", "--config", IN21K, "--dry-run", f"data.root={root}", "data.num_samples=null")
    assert rc == 2 and "data.num_samples" in err and root in err
