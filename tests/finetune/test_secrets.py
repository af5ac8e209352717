"""Nothing secret reaches MLflow: scrubbing of params, tags and logged files; names and lineage."""

from __future__ import annotations

import pytest

from pipeline.registry import lineage_tags, model_name, scrub
from pipeline.secrets import REDACTED, scrub_text


def test_scrub_redacts_secret_names_values_and_url_credentials():
    cfg = {
        "data": {"root": "s3://AKIAABCDEFGHIJKLMNOP:hunter2@bucket/x"},
        "aws_secret_access_key": "abc",
        "token": "t0k",
        "logging": {"mlflow_tracking_uri": "https://user:pa55@mlflow.example/"},
        "presigned": "https://b.s3/x?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP&X-Amz-Signature=ff&part=1",
        "note": "key AKIAABCDEFGHIJKLMNOP in text",
        "lr": 5e-5,
        "names": ["a", "http://u:p@h/"],
    }
    out = scrub(cfg)
    flat = repr(out)
    for secret in ("hunter2", "pa55", "abc", "t0k", "AKIAABCDEFGHIJKLMNOP", "=ff"):
        assert secret not in flat, secret
    assert out["aws_secret_access_key"] == REDACTED
    assert out["logging"]["mlflow_tracking_uri"].endswith("@mlflow.example/")
    assert "part=1" in out["presigned"]
    assert out["lr"] == 5e-5 and out["names"][0] == "a"
    assert scrub_text("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # endpoints without keys stay


def test_model_name_and_lineage():
    assert model_name("coatnet_2", "imagenet-1k") == "coatnet-2-imagenet-1k"
    assert model_name("coatnet_pico", "digits") == "coatnet-pico-digits"
    tags = lineage_tags(manifest_hash="h", pretrain_run_id=None, finetune_run_id="f")
    assert tags["lineage.manifest_hash"] == "h" and tags["lineage.finetune_run_id"] == "f"
    assert "lineage.pretrain_run_id" not in tags and tags["lineage.code_version"]
    with pytest.raises(ValueError, match="unknown lineage"):
        lineage_tags(manifest="h")
