"""A timm model through the pipeline (``model.name: timm/<name>``): 2-rank ZeRO-3 training with the EMA and
activation checkpointing, a sample-exact resume, the export rebuilt for evaluation; sizing; and the one-line
errors of what only a CoAtNet has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import read_losses, read_samples, tiny

from pipeline import models
from pipeline.cli import main
from pipeline.evaluate import load_run
from pipeline.finetune.config import from_mapping
from pipeline.finetune.finetune import _check_fits, _target_model
from pipeline.train import launch
from pipeline.train.config import ConfigError, load_config, read_recipe
from pipeline.train.dry_run import dry_run

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / "configs" / "pretrain" / "demo_timm_maxxvit.yaml"
# The recipe's MaxxVit at 32 px: stage 4's attention sees one token, stage 3's a 2x2 window.
TIMM = ["model.img_size=32", "data.train_split=minival", "data.eval_split=minival", "train.global_batch_size=16",
        "train.micro_batch_size=8", "eval.max_samples=16", "deepspeed.zero_stage=3", "train.max_steps=4",
        "checkpoint.interval_steps=2", "train.record_samples=true", "model.drop_path_rate=0.0", "ema.decay=0.9",
        "model.grad_checkpointing=true"]  # timm's set_grad_checkpointing, under ZeRO-3


def _overrides(shards: str, out: Path) -> list[str]:
    # tiny() names coatnet_pico; the peer recipe's model (with its overrides) replaces it.
    return [o for o in tiny(shards, out, *TIMM) if not o.startswith(("model.name=", "model.img_size="))] + TIMM[:1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_timm_model_trains_on_2_ranks_and_resumes_sample_exactly(digits_shards, tmp_path):
    ref = launch(PEER, _overrides(digits_shards, tmp_path / "ref"), launcher="local", nproc=2)
    assert ref.finished and ref.step == 4
    out = tmp_path / "resumed"
    mine = _overrides(digits_shards, out)
    first = launch(PEER, [*mine, "train.stop_after_steps=2"], launcher="local", nproc=2, resume="none")
    assert first.step == 2 and not first.finished
    resumed = launch(PEER, mine, launcher="local", nproc=2, resume="auto")
    assert resumed.finished and resumed.step == 4
    assert read_samples(out) == read_samples(ref.output_dir)
    want, got = read_losses(ref.output_dir), read_losses(out)
    assert set(want) <= set(got)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    for a, b in ((resumed.weights, ref.weights), (resumed.ema_weights, ref.ema_weights)):
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-5, msg=k)
    # The export rebuilds the timm model (not a CoAtNet) for evaluation and registration.
    cfg = json.loads(Path(resumed.model_config).read_text())
    assert cfg["name"] == "timm/coatnet_0_224" and cfg["config"] is None
    source = load_run(resumed.output_dir)
    assert type(source.models["raw"]).__name__ == "MaxxVit" and set(source.models) == {"raw", "ema"}
    with torch.no_grad():
        assert source.models["ema"](torch.zeros(2, 3, 32, 32)).shape == (2, 20)


def test_peer_recipe_builds_coatnet_pico_shape_in_timm():
    cfg = load_config(PEER, ["model.num_classes=40", "model.img_size=64"], check_data=False)
    m = cfg.model
    model = models.create_model(m.name, num_classes=40, img_size=64, overrides=m.overrides, device="meta")
    assert type(model).__name__ == "MaxxVit"
    params = sum(p.numel() for p in model.parameters())
    pico = sum(p.numel() for p in models.create_model("coatnet_pico", num_classes=40, img_size=64,
                                                      device="meta").parameters())
    assert abs(params - pico) <= 16  # pico's second stem conv has a bias, MaxxVit's not
    assert models.count(m.name, num_classes=40, img_size=64, overrides=m.overrides)[0] == params
    # Weight decay spares timm's relative-position tables, as it spares CoAtNet's.
    assert any("relative_position_bias_table" in n for n in model.no_weight_decay())


def test_unknown_timm_name_is_one_line_exit_2(capsys):
    rc = main(["pretrain", "--config", str(PEER), "--dry-run", "model.name=timm/coatnet_0_22",
               "data.num_samples=1000", "model.num_classes=40"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "model.name: 'timm/coatnet_0_22' is not a model timm" in err and "timm/coatnet_0_224" in err
    with pytest.raises(ConfigError, match=r"model.overrides: img_size set by the model section"):
        load_config(PEER, ["model.overrides.img_size=64"], check_data=False)


def test_relative_table_resize_of_a_timm_model_is_a_one_line_error(tmp_path):
    # A 32 px checkpoint of the peer fine-tuned at 64 px: its tables would need the resize only CoAtNet has.
    data = read_recipe(PEER)
    data["finetune"] = {"pretrained": str(tmp_path / "w.safetensors"), "head_init": "zero"}
    small = from_mapping(data, ["model.num_classes=10", "model.img_size=32"], check_data=False)
    state = _target_model(small, 10).to_empty(device="cpu").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    _check_fits(state, small, _target_model(small, 10))  # at the pretraining resolution it fits as it is
    big = from_mapping(data, ["model.num_classes=10", "model.img_size=64"], check_data=False)
    with pytest.raises(ConfigError) as e:
        _check_fits(state, big, _target_model(big, 10))
    msg = str(e.value)
    assert "\n" not in msg and "relative_position_bias_table" in msg
    assert "resized to a new resolution only for CoAtNet models, not MaxxVit" in msg
    # The same check lets a CoAtNet through: its tables are resized.
    pico = from_mapping({**data, "model": {"name": "coatnet_pico"}}, ["model.num_classes=10", "model.img_size=32"],
                        check_data=False)
    pico_state = _target_model(pico, 10).to_empty(device="cpu").state_dict()
    pico64 = from_mapping({**data, "model": {"name": "coatnet_pico"}}, ["model.num_classes=10", "model.img_size=64"],
                          check_data=False)
    _check_fits(pico_state, pico64, _target_model(pico64, 10))


def test_classifier_keys_for_head_transfer():
    peer = load_config(PEER, ["model.num_classes=40"], check_data=False).model
    timm_model = models.create_model(peer.name, num_classes=40, img_size=32, overrides=peer.overrides, device="meta")
    assert models.classifier_keys(timm_model) == ("head.fc.weight", "head.fc.bias")
    resnet = models.create_model("timm/resnet18", num_classes=5, img_size=32, device="meta")  # takes no img_size
    assert models.classifier_keys(resnet) == ("fc.weight", "fc.bias")
    pico = models.create_model("coatnet_pico", num_classes=5, img_size=32, device="meta")
    assert models.classifier_keys(pico) == ("head.fc.weight", "head.fc.bias")
    with pytest.raises(ValueError, match="no get_classifier/reset_classifier"):
        models.classifier_keys(torch.nn.Linear(2, 2))


def test_dry_run_sizes_a_timm_model_like_a_coatnet():
    recipe = REPO / "configs" / "pretrain" / "coatnet_0_in1k.yaml"
    ours = dry_run(recipe, ["data.num_samples=imagenet1k"], world_size=8)
    peer = dry_run(recipe, ["data.num_samples=imagenet1k", "model.name=timm/coatnet_0_224"], world_size=8)
    # timm's coatnet_0 is the same network: parameters within 3%, MACs and memory per rank within 15%.
    assert peer.plan.params == pytest.approx(ours.plan.params, rel=0.03)
    assert peer.plan.macs_per_image == pytest.approx(ours.plan.macs_per_image, rel=0.15)
    assert peer.memory_gib_per_rank == pytest.approx(ours.memory_gib_per_rank, rel=0.15)
    assert not any(w.startswith("memory") for w in peer.warnings)
