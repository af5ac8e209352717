"""Fine-tuning recipes: the paper's values, and bad input rejected before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ft_helpers import REPO
from safetensors.torch import save_file

import coatnet
from pipeline import models
from pipeline.cli import main
from pipeline.finetune import CheckpointNotFound, consolidate, load_finetune_config, prepare_init_weights
from pipeline.finetune.config import from_mapping
from pipeline.train.config import ConfigError

RECIPES = sorted((REPO / "configs/finetune").glob("coatnet_*_in21k_to_in1k_*.yaml"))


def test_paper_recipes_are_table_10s_21k_to_1k_column():
    assert [p.name for p in RECIPES] == [f"coatnet_{n}_in21k_to_in1k_{r}.yaml" for n in (2, 3, 4) for r in (384, 512)]
    for path in RECIPES:
        n, res = int(path.name.split("_")[1]), int(path.stem.rsplit("_", 1)[1])
        c = load_finetune_config(path, check_data=False)
        t = c.train
        assert (t.model.name, t.model.img_size, t.model.num_classes) == (f"coatnet_{n}", res, 1000)
        assert t.model.drop_path_rate == {2: 0.3, 3: 0.5, 4: 0.7}[n]
        assert (t.optim.lr, t.optim.min_lr, t.optim.weight_decay, t.optim.grad_clip) == (5e-5, 5e-5, 1e-8, 1.0)
        assert (t.schedule.type, t.schedule.warmup_steps, t.schedule.warmup_epochs) == ("constant", 0, 0.0)
        assert (t.loss.type, t.loss.label_smoothing) == ("softmax", 0.1)
        assert t.ema.decay == 0.9999 and t.train.epochs == 30 and t.train.global_batch_size == 1024
        assert t.augment.mixup_alpha == 0 and t.augment.randaugment is not None and not t.eval.center_crop
        assert c.finetune.head_init == "select"


def test_demo_recipe_is_a_higher_resolution_than_its_pretraining():
    import yaml

    demo = load_finetune_config(REPO / "configs/finetune/demo.yaml", check_data=False)
    pre = yaml.safe_load((REPO / "configs/pretrain/demo.yaml").read_text())
    assert demo.train.model.name == pre["model"]["name"]
    assert demo.train.model.img_size > pre["model"]["img_size"]
    assert demo.train.ema.decay and demo.train.schedule.type == "constant"


def _recipe(**finetune) -> dict:
    return {"finetune": finetune, "data": {"root": "x"}, "output_dir": "y"}


@pytest.mark.parametrize("section,message", [
    ({"pretrained": "p", "source_classes": "s", "typo": 1}, "unknown key 'finetune.typo'"),
    ({"pretrained": "p", "source_classes": "s", "head_init": "average"}, "finetune.head_init"),
    ({"pretrained": "p"}, "finetune.source_classes"),
    ({"source_classes": "s"}, "pretrained"),
])
def test_bad_finetune_sections_name_the_key(section, message):
    with pytest.raises((ConfigError, TypeError), match=message):
        from_mapping(_recipe(**section), check_data=False)


def test_overrides_reach_both_sections():
    c = from_mapping(_recipe(pretrained="p", source_classes="s"),
                     ["finetune.head_init=zero", "model.img_size=64"], check_data=False)
    assert c.finetune.head_init == "zero" and c.train.model.img_size == 64
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(_recipe(pretrained="p", source_classes="s"), ["model.imgsize=64"], check_data=False)


def _dataset(root: Path, classes: list[str], **extra) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"classes": classes, "num_classes": len(classes), **extra}))
    return str(root)


def _weights(path: Path, name: str, num_classes: int) -> str:
    m = coatnet.create_model(name, num_classes=num_classes, img_size=32)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return str(path)


def test_a_checkpoint_of_another_variant_is_rejected_before_training(tmp_path):
    target = _dataset(tmp_path / "digits", [str(d) for d in range(10)])
    source = _dataset(tmp_path / "d21k", [f"{d}_r{k}" for d in range(10) for k in (0, 90)],
                      parent_map=[i // 2 for i in range(20)], parent_classes=[str(d) for d in range(10)])
    wrong = _weights(tmp_path / "nano.safetensors", "coatnet_nano", 20)
    c = from_mapping({"finetune": {"pretrained": wrong, "source_classes": source}, "data": {"root": target},
                      "output_dir": str(tmp_path / "out"), "model": {"name": "coatnet_pico", "img_size": 48}},
                     check_data=False)
    with pytest.raises(ConfigError, match="does not fit model.name=coatnet_pico"):
        prepare_init_weights(c)
    # The right variant, but a source label space of another size than its head.
    right = _weights(tmp_path / "pico.safetensors", "coatnet_pico", 30)
    c = from_mapping({"finetune": {"pretrained": right, "source_classes": source}, "data": {"root": target},
                      "output_dir": str(tmp_path / "out"), "model": {"name": "coatnet_pico", "img_size": 48}},
                     check_data=False)
    with pytest.raises(ConfigError, match="20 classes but the pretrained head has 30 rows"):
        prepare_init_weights(c)
    assert not (tmp_path / "out" / "finetune" / "init.safetensors").exists()


def test_prepare_from_a_weights_file_maps_rows_and_loads_at_the_new_resolution(tmp_path):
    from safetensors.torch import load_file

    target = _dataset(tmp_path / "digits", [str(d) for d in range(10)])
    source = _dataset(tmp_path / "d21k", [f"{d}_r{k}" for d in range(10) for k in (0, 90)],
                      parent_map=[i // 2 for i in range(20)], parent_classes=[str(d) for d in range(10)])
    pre = _weights(tmp_path / "pico.safetensors", "coatnet_pico", 20)
    c = from_mapping({"finetune": {"pretrained": pre, "source_classes": source}, "data": {"root": target},
                      "output_dir": str(tmp_path / "out"), "model": {"name": "coatnet_pico", "img_size": 48}},
                     check_data=False)
    prepared = prepare_init_weights(c)
    init = load_file(str(prepared.path))
    assert torch.equal(init["head.fc.weight"], load_file(pre)["head.fc.weight"][0::2])
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=48)
    model.load_state_dict(init, strict=True)  # the trainer's strict load, tables resized by the hook
    assert prepare_init_weights(c).reused


def test_a_timm_model_takes_the_21k_to_1k_head_transfer_through_its_classifier(tmp_path):
    """resnet18's classifier is ``fc`` (timm's get_classifier names it), not CoAtNet's ``head.fc``."""
    from safetensors.torch import load_file

    target = _dataset(tmp_path / "digits", [str(d) for d in range(10)])
    source = _dataset(tmp_path / "d21k", [f"{d}_r{k}" for d in range(10) for k in (0, 90)],
                      parent_map=[i // 2 for i in range(20)], parent_classes=[str(d) for d in range(10)])
    pre = tmp_path / "resnet.safetensors"
    state = models.create_model("timm/resnet18", num_classes=20, img_size=32).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(pre))
    c = from_mapping({"finetune": {"pretrained": str(pre), "source_classes": source}, "data": {"root": target},
                      "output_dir": str(tmp_path / "out"), "model": {"name": "timm/resnet18", "img_size": 32}},
                     check_data=False)
    init = load_file(str(prepare_init_weights(c).path))
    assert torch.equal(init["fc.weight"], state["fc.weight"][0::2]) and "head.fc.weight" not in init
    models.create_model("timm/resnet18", num_classes=10, img_size=32).load_state_dict(init, strict=True)


def test_consolidate_rejects_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match="not a DeepSpeed checkpoint"):
        consolidate(tmp_path / "empty", tmp_path / "x.safetensors")


def test_dry_run_before_pretraining_and_without_credentials(monkeypatch, tmp_path, capsys):
    """`coatnet finetune --dry-run` of a paper row whose pretraining has not run: the plan, and warnings."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    rc = main(["finetune", "--config", str(REPO / "configs/finetune/coatnet_2_in21k_to_in1k_384.yaml"), "--dry-run",
               "--json", "--launcher", "ray", "--num-workers", "16", f"output_dir={tmp_path / 'ft'}",
               f"finetune.pretrained={tmp_path / 'not-pretrained-yet'}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    printed = json.loads(out)
    assert printed["init"] is None and printed["train"] is None
    p = printed["plan"]
    assert (p["world_size"], p["micro_batch_size"], p["grad_accum_steps"], p["num_classes"]) == (16, 64, 1, 1000)
    assert p["total_steps"] == 30 * p["steps_per_epoch"] and p["memory_gib_per_rank"] > 0
    w = printed["warnings"]
    assert any(x.startswith("finetune.pretrained: no checkpoint") for x in w)
    assert any("credentials" in x and "finetune.source_classes=s3://coatnet-datasets/imagenet21k" in x for x in w)
    assert any(x.startswith("initial weights not prepared") for x in w) and err.count("WARNING: ") == len(w)
    assert not (tmp_path / "ft").exists()
