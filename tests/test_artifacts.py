"""pipeline.artifacts: the files between stages load as before (unknown keys kept) locally and on S3."""

from __future__ import annotations

import json

import pytest

from pipeline import storage
from pipeline.artifacts import (
    EvaluationReport,
    Manifest,
    ManifestNotFound,
    RunDir,
    TrainResult,
    read_manifest,
)

RESULT = {"output_dir": "o", "checkpoint_dir": "o/checkpoints", "last_checkpoint": None, "step": 3, "epoch": 1,
          "total_steps": 3, "finished": True, "config_hash": "abc", "final_metrics": {"loss": 0.5},
          "mlflow_run_id": None, "weights": "o/model.safetensors", "ema_weights": None,
          "model_config": "o/model_config.json", "curve_png": None}


def test_train_result_round_trips_byte_for_byte_with_unknown_keys(tmp_path):
    on_disk = json.dumps({**RESULT, "written_by_newer_trainer": [1, 2]}, indent=2)
    (tmp_path / RunDir.RESULT).write_text(on_disk)
    result = TrainResult.read(tmp_path)
    assert result.step == 3 and result.finished and result.model_config == "o/model_config.json"
    assert result.extra == {"written_by_newer_trainer": [1, 2]}
    RunDir(tmp_path / "copy").write_result(result)
    assert (tmp_path / "copy" / RunDir.RESULT).read_text() == on_disk


def test_manifest_typed_accessors_and_unknown_keys():
    m = Manifest.model_validate({"num_classes": 2, "classes": ["a", "b"], "source": "digits",
                                 "splits": {"val": {"samples": 7, "bytes": 9, "masked": [4]}},
                                 "quarantined": []})
    assert m.samples("val") == 7 and m.masked("val") == [4] and m.split("val").bytes == 9
    assert m.samples("minival") == 0 and m.masked("minival") == []  # no such split
    assert m.to_dict()["quarantined"] == []


def test_read_manifest_follows_latest_and_names_a_missing_one(tmp_path):
    root = tmp_path / "cfg-1"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"num_classes": 3, "manifest_hash": "h"}))
    (tmp_path / "LATEST").write_text("cfg-1")
    m = read_manifest(str(tmp_path))
    assert m.root == str(root) and m.num_classes == 3 and m.manifest_hash == "h"
    with pytest.raises(ManifestNotFound, match="no manifest.json"):
        read_manifest(str(tmp_path / "nothing"))
    (root / "manifest.json").write_text("{}")  # no num_classes: not a manifest
    with pytest.raises(ManifestNotFound, match="cannot read the dataset manifest"):
        read_manifest(str(root))


def test_evaluation_report_keeps_the_written_order_and_extra_keys(tmp_path):
    report = {"model": "run", "data": "d", "split": "val", "manifest_hash": "h", "num_classes": 2,
              "preprocessing": {"img_size": 32}, "batch_size": 4, "device": "cpu", "torch_threads": 1,
              "created": "now", "weights": {"raw": {"top1": 0.5}, "ema": {"top1": 0.75}}, "best": "ema",
              "out_dir": str(tmp_path), "mlflow_run_id": None, "registered_weights": "ema"}
    uri = EvaluationReport.model_validate(report).write(tmp_path)
    assert (tmp_path / RunDir.EVALUATION).read_text() == json.dumps(report, indent=2)
    back = EvaluationReport.read(tmp_path)
    assert back.best_metrics == {"top1": 0.75} and back.to_dict() == report
    assert EvaluationReport.read(uri) == back


def test_run_dir_on_s3(s3_bucket):
    run = RunDir(f"{s3_bucket}/runs/a")
    assert run.evaluation("val") == f"{s3_bucket}/runs/a/eval/val/evaluation.json"
    run.write_json(RunDir.PLAN, {"total_steps": 5})
    assert run.exists(RunDir.PLAN) and run.read_json(RunDir.PLAN) == {"total_steps": 5}
    assert run.read_finetune_record() is None
    run.write_result(TrainResult.from_dict(RESULT))
    assert run.read_result() == TrainResult.from_dict(RESULT)
    assert storage.exists(run.join(RunDir.RESULT))
    with pytest.raises(ValueError, match="not a local directory"):
        _ = run.path
