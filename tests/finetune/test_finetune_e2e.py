"""Pretrain (demo, short) -> fine-tune at a higher resolution -> evaluate -> register -> load by alias -> predict.

Everything is real: DeepSpeed ZeRO-2 with 2 CPU ranks over gloo, streaming shards of the digits,
an `mlflow server` with a SQLite registry and HTTP-served artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ft_helpers import REPO, finetune_overrides
from safetensors.torch import load_file

from pipeline import storage
from pipeline.cli import main
from pipeline.data import resolve_root
from pipeline.evaluate import Preprocessing, build_model, evaluate, load_run
from pipeline.finetune import consolidate, load_finetune_config
from pipeline.registry import CANDIDATE, CHAMPION
from pipeline.train import launch

pytestmark = [pytest.mark.slow]

# finetuned, evaluated, registered: tests/finetune/conftest.py (shared with test_mlflow_serve.py)


def _printed_json(capsys) -> dict:
    """The JSON document a CLI command printed last (MLflow prints its own lines before it)."""
    out = capsys.readouterr().out
    start = 0 if out.startswith("{") else out.rindex("\n{\n") + 1
    return json.loads(out[start:])


def _val_images(shards: dict[str, str], pre: Preprocessing) -> tuple[list[str], torch.Tensor]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(Path(resolve_root(shards["digits"]), "val")), shuffle=False, batch_size=64)
    rows = [ds[i] for i in range(len(ds))]
    return [r["key"] for r in rows], torch.stack([pre.decode(r["image"]) for r in rows])


@pytest.mark.timeout(600)
def test_finetune_runs_through_the_trainer_at_a_higher_resolution(finetuned, demo_pretrained, demo_shards,
                                                                  capsys):
    t = finetuned.train
    assert t.finished and t.step == t.total_steps
    assert Path(t.last_checkpoint).is_dir() and Path(t.ema_weights).is_file()
    # The init file holds the pretraining resolution's tables (32x32 input) and the upright-digit rows.
    init = load_file(str(finetuned.init.path))
    pre_sd = load_file(str(consolidate(demo_pretrained, finetuned.init.path.parent / "check.safetensors")))
    assert finetuned.init.head["rows"] == [[4 * d] for d in range(10)]
    assert torch.equal(init["head.fc.weight"], pre_sd["head.fc.weight"][0::4])
    tables = [k for k in init if k.endswith("rel_bias.table")]
    assert tables and all(torch.equal(init[k], pre_sd[k]) for k in tables)
    final = load_file(t.weights)
    assert all(final[k].shape[1:] != init[k].shape[1:] for k in tables)  # resized to the 48x48 grids
    # The same trainer's MLflow run, on the test server.
    assert t.mlflow_run_id and mlflow.MlflowClient().get_run(t.mlflow_run_id)
    # A rerun with the same recipe reuses the prepared weights instead of consolidating again (CLI dry run).

    rc = main(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), "--dry-run", "--json",
               *finetune_overrides(demo_shards, demo_pretrained, Path(finetuned.output_dir))])
    printed = _printed_json(capsys)
    assert rc == 0 and printed["init"]["reused"] and printed["init"]["path"] == str(finetuned.init.path)
    assert printed["train"] is None


@pytest.mark.timeout(600)
def test_evaluate_register_load_by_alias_predicts_what_evaluation_saw(finetuned, evaluated, registered, demo_shards,
                                                                      tmp_path):
    out = Path(evaluated["out_dir"])
    assert set(evaluated["weights"]) == {"raw", "ema"}
    for w, s in evaluated["weights"].items():
        assert s["num_samples"] == 359 and 0 <= s["ece"] <= 1 and len(s["per_class_accuracy"]) == 10
        assert s["top5"] >= s["top1"]
        for png in (f"reliability_{w}.png", f"confusion_{w}.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "evaluation.json").read_text())["best"] == evaluated["best"]
    assert evaluated["mlflow_run_id"] == finetuned.train.mlflow_run_id
    logged = mlflow.MlflowClient().get_run(evaluated["mlflow_run_id"])
    assert logged.data.metrics["eval/val/ema/top1"] == pytest.approx(evaluated["weights"]["ema"]["top1"])

    reg = registered
    assert reg.name == "coatnet-pico-digits"
    assert set(reg.aliases) == {CANDIDATE, CHAMPION} and reg.promoted
    client = mlflow.MlflowClient()
    mv = client.get_model_version(reg.name, reg.version)
    assert mv.tags["lineage.finetune_run_id"] == finetuned.train.mlflow_run_id
    assert mv.tags["lineage.manifest_hash"] == evaluated["manifest_hash"]
    assert mv.tags["lineage.code_version"] and "lineage.pretrain_run_id" not in mv.tags  # pretraining had no MLflow
    assert mv.tags["gate.decision"] == "promoted" and mv.tags["gate.margin"] == "0.0"

    best = evaluated["best"]
    seen = np.load(out / f"predictions_{best}.npz")
    pre = Preprocessing.from_dict(evaluated["preprocessing"])
    keys, x = _val_images(demo_shards, pre)
    order = {k: i for i, k in enumerate(seen["keys"].tolist())}
    expected_top1 = seen["topk"][[order[k] for k in keys], 0]

    model = mlflow.pytorch.load_model(f"models:/{reg.name}@{CHAMPION}")
    with torch.no_grad():
        logits = model(x)
    assert np.array_equal(logits.argmax(1).numpy(), expected_top1)
    local = build_model(load_run(finetuned.output_dir, (best,)).model_config, Path(finetuned.output_dir) /
                        ("model_ema.safetensors" if best == "ema" else "model.safetensors"))
    with torch.no_grad():
        assert torch.allclose(logits, local(x), atol=1e-4)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{reg.name}@{CANDIDATE}")
    out_np = np.asarray(pyfunc.predict(x[:7].numpy()))  # any batch size: the batch dimension is dynamic
    assert out_np.shape == (7, 10) and np.allclose(out_np, logits[:7].numpy(), atol=1e-4)
    meta = mlflow.models.get_model_info(f"models:/{reg.name}@{CHAMPION}")
    assert list(meta.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 48, 48]
    assert meta.metadata["preprocessing"]["img_size"] == 48 and not meta.metadata["preprocessing"]["center_crop"]

    # The same command evaluates the registered model again and sees the same top-1.

    rc = main(["evaluate", "--model", f"models:/{reg.name}@{CHAMPION}", "--data", demo_shards["digits"],
               "--out", str(tmp_path / "again"), "--no-mlflow", "--workers", "0"])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    assert again["weights"]["registry"]["top1"] == pytest.approx(evaluated["weights"][best]["top1"])
    assert again["weights"]["registry"]["loss"] == pytest.approx(evaluated["weights"][best]["loss"], abs=1e-4)


@pytest.mark.timeout(600)
def test_pretrained_beats_scratch_and_the_gate_keeps_the_worse_model_out(
        finetuned, evaluated, registered, demo_shards, mlflow_server, tmp_path, capsys):
    # The same recipe, same steps, from a random initialisation (no init_weights) through the same trainer.
    # (The trainer takes its tracking URI from the recipe, not from MLFLOW_TRACKING_URI: point it at the server.)
    cfg = load_finetune_config(REPO / "configs/finetune/demo.yaml",
                               [*finetune_overrides(demo_shards, Path("unused"), tmp_path / "scratch"),
                                f"logging.mlflow_tracking_uri={mlflow_server}"]).train
    scratch = launch(cfg, [], launcher="local", nproc=2)
    assert scratch.finished
    ev = evaluate(scratch.output_dir, demo_shards["digits"], split="val", num_workers=0, progress=False)
    ours = max(s["top1"] for s in evaluated["weights"].values())
    theirs = max(s["top1"] for s in ev["weights"].values())
    print(f"val top-1: fine-tuned from pretraining {ours:.4f}, from scratch {theirs:.4f}")
    assert ours > theirs + 0.05, (ours, theirs)

    # Registering the worse model: candidate moves to it, champion stays.

    rc = main(["register", "--model", scratch.output_dir, "--json"])  # its eval/val/evaluation.json by default
    worse = _printed_json(capsys)
    assert rc == 0 and worse["name"] == registered.name
    assert not worse["promoted"] and worse["aliases"] == [CANDIDATE]
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(registered.name, CHAMPION).version == registered.version
    assert client.get_model_version_by_alias(registered.name, CANDIDATE).version == worse["version"]
    tags = client.get_model_version(registered.name, worse["version"]).tags
    assert tags["gate.decision"] == "kept" and tags["lineage.finetune_run_id"] == scratch.mlflow_run_id


@pytest.mark.timeout(300)
def test_consolidate_a_checkpoint_from_object_storage(demo_pretrained, s3_bucket, tmp_path):
    storage.reset_clients()  # the S3 fixture set the endpoint and credentials
    storage.upload_dir(demo_pretrained / "checkpoints", f"{s3_bucket}/pretrain/checkpoints")
    local = load_file(str(consolidate(demo_pretrained, tmp_path / "local.safetensors")))
    for uri in (f"{s3_bucket}/pretrain", f"{s3_bucket}/pretrain/checkpoints"):
        remote = load_file(str(consolidate(uri, tmp_path / "remote.safetensors")))
        assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    # The trainer's own export of the same final checkpoint holds the same weights.
    exported = load_file(str(demo_pretrained / "model.safetensors"))
    assert all(torch.equal(exported[k], local[k]) for k in local)
