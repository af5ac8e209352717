"""The registry on a real `mlflow server`: the promotion gate, loading by alias, and no secrets logged."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import coatnet
from pipeline import models
from pipeline.registry import CANDIDATE, CHAMPION, champion, register_model

pytestmark = [pytest.mark.slow]

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=32).eval()
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _register(tiny, name, top1, margin=0.0, **kw):
    model, path = tiny
    return register_model(model, name=name, top1=top1, img_size=32, num_classes=10, weights_file=path,
                          model_config={"name": "coatnet_pico", "config": model.config.to_dict()},
                          preprocessing={"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, margin=margin,
                          validate=False, **kw)


@pytest.mark.timeout(300)
def test_gate_moves_champion_only_past_the_margin(mlflow_server, tiny):
    name = "coatnet-pico-gate"
    v1 = _register(tiny, name, 0.50)
    assert v1.promoted and set(v1.aliases) == {CANDIDATE, CHAMPION}
    v2 = _register(tiny, name, 0.40)  # worse: candidate only
    assert not v2.promoted and v2.aliases == (CANDIDATE,)
    v3 = _register(tiny, name, 0.52, margin=0.05)  # better, but not by the margin
    assert not v3.promoted and v3.gate.champion_version == v1.version
    client = mlflow.MlflowClient()
    tags = client.get_model_version(name, v3.version).tags
    assert tags["gate.decision"] == "kept" and float(tags["gate.margin"]) == 0.05
    assert float(tags["gate.champion_top1"]) == 0.5 and tags["gate.previous_champion"] == v1.version
    assert champion(name) == (v1.version, 0.5)
    assert client.get_model_version_by_alias(name, CANDIDATE).version == v3.version
    v4 = _register(tiny, name, 0.60, margin=0.05)
    assert v4.promoted and champion(name) == (v4.version, 0.6)
    with pytest.raises(ValueError, match="margin"):
        _register(tiny, name, 0.9, margin=-0.1)


@pytest.mark.timeout(300)
def test_load_by_alias_both_flavours_and_no_secrets_anywhere(mlflow_server, tiny, tmp_path, monkeypatch):
    model, path = tiny
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    name = "coatnet-pico-secrets"
    reg = _register(
        tiny, name, 0.3,
        params={"checkpoint": {"upload_uri": f"s3://{KEY_ID}:{SECRET}@bucket/ckpt"},
                "aws_secret_access_key": SECRET, "lr": 5e-5},
        evaluation={"data": f"https://user:{SECRET}@host/data?X-Amz-Signature={SECRET}", "top1": 0.3},
        lineage={"manifest_hash": "m0", "pretrain_run_id": "p1"},
    )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    got = mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")(x)
    assert torch.allclose(got, want, atol=1e-5)
    pred = np.asarray(mlflow.pyfunc.load_model(f"models:/{name}@{CANDIDATE}").predict(x.numpy()))
    assert np.allclose(pred, want.numpy(), atol=1e-5)

    client = mlflow.MlflowClient()
    run = client.get_run(reg.run_id)
    mv = client.get_model_version(name, reg.version)
    assert run.data.params["lr"] == "5e-05" and mv.tags["lineage.pretrain_run_id"] == "p1"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{reg.version}", dst_path=str(tmp_path / "m")))
    texts = [repr(run.data.params), repr(run.data.tags), repr(mv.tags)]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in local.rglob("*") if p.is_file()]
    for t in texts:
        assert SECRET not in t and KEY_ID not in t
    # The weights ride along as safetensors and rebuild the same model without MLflow.
    st = next(local.rglob("model.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_file(str(st)).items())
    meta = json.loads(next(local.rglob("preprocessing.json")).read_text())
    assert meta["img_size"] == 32


@pytest.mark.timeout(300)
def test_a_timm_model_registers_and_its_artefact_rebuilds_it(mlflow_server, tmp_path):
    """The pt2 program serves it; the attached model_config.json and safetensors rebuild the timm model."""
    overrides = {"embed_dim": [24, 32, 64, 128], "depths": [1, 1, 1, 1], "stem_width": 16,
                 "transformer_dim_head": 16, "head_hidden_size": 0}
    config = {"name": "timm/coatnet_0_224", "num_classes": 10, "img_size": 32, "overrides": overrides, "config": None}
    torch.manual_seed(0)
    model = models.from_model_config(config).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    name = "coatnet-timm-peer"
    reg = register_model(model, name=name, top1=0.5, img_size=32, num_classes=10, weights_file=path,
                         model_config=config, preprocessing={"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                         validate=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")(x), want, atol=1e-5)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{reg.version}", dst_path=str(tmp_path / "m")))
    rebuilt = models.from_model_config(json.loads(next(local.rglob("model_config.json")).read_text()))
    rebuilt.load_state_dict(load_file(str(next(local.rglob("model.safetensors")))), strict=True)
    assert type(rebuilt).__name__ == "MaxxVit"
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), want, atol=1e-6)
    assert any(r.startswith("timm==") for r in next(local.rglob("requirements.txt")).read_text().split())
