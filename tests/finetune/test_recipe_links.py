"""Every fine-tuning recipe connects to the pretraining recipe it follows, as the plain CLI path runs them:
`coatnet pretrain --config P` writes P's output_dir from P's dataset; `coatnet finetune --config F` must read
exactly that run directory and that dataset's label space, with the same variant at a higher resolution."""

from __future__ import annotations

import re

import pytest
from ft_helpers import REPO

from pipeline.finetune import load_finetune_config
from pipeline.finetune.config import from_mapping
from pipeline.train.config import ConfigError, load_config

PRETRAIN = REPO / "configs/pretrain"
FINETUNE = sorted((REPO / "configs/finetune").glob("*.yaml"))
# The paper's fine-tuning resolutions after pretraining at 224 (Table 2; spec: "always a resolution change").
PAPER_RESOLUTIONS = {384, 512}


def _pairs():
    for path in FINETUNE:
        ft = load_finetune_config(path, check_data=False)
        assert ft.finetune.follows, f"{path.name} names no pretraining recipe (finetune.follows)"
        yield path, ft, load_config(ft.finetune.follows, check_data=False)


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.stem)
def test_finetune_recipe_connects_to_the_pretraining_it_follows(path):
    ft = load_finetune_config(path, check_data=False)
    pre = load_config(ft.finetune.follows, check_data=False)
    t = ft.train
    assert ft.finetune.pretrained == pre.output_dir  # the run directory `coatnet pretrain` writes
    assert ft.finetune.source_classes == pre.data.root  # the dataset whose manifest is the label space
    assert t.model.name == pre.model.name
    assert t.model.drop_path_rate == pre.model.drop_path_rate  # Table 10: "same" as in pretraining
    assert t.model.img_size > pre.model.img_size
    if path.stem != "demo":
        n, pre_row, res = re.fullmatch(r"coatnet_(\d)_(in21k(?:_pt_ra)?)_to_in1k_(\d+)", path.stem).groups()
        assert pre.name == f"coatnet_{n}_{pre_row}" and (PRETRAIN / f"{pre.name}.yaml").samefile(ft.finetune.follows)
        assert pre.model.img_size == 224 and t.model.img_size == int(res) and int(res) in PAPER_RESOLUTIONS
        assert (pre.loss.type, t.loss.type) == ("sigmoid", "softmax")
        assert t.model.num_classes == 1000 and t.data.num_samples == "imagenet1k"


def test_every_21k_pretraining_recipe_is_followed():
    followed = {pre.name for _, _, pre in _pairs()}
    assert {p.stem for p in PRETRAIN.glob("coatnet_*_in21k*.yaml")} <= followed
    assert "demo-pretrain" in followed


def test_explicit_locations_win_and_a_wrong_variant_is_rejected(tmp_path, monkeypatch):
    follows = str(PRETRAIN / "coatnet_2_in21k.yaml")
    base = {"data": {"root": "x"}, "output_dir": "y", "model": {"name": "coatnet_2"}}
    c = from_mapping({"finetune": {"follows": follows, "pretrained": "s3://b/run/checkpoints"}, **base},
                     check_data=False)
    assert c.finetune.pretrained == "s3://b/run/checkpoints"
    assert c.finetune.source_classes == "s3://coatnet-datasets/imagenet21k"
    with pytest.raises(ConfigError, match=r"model\.name: coatnet_3, but finetune\.follows=.* pretrains coatnet_2"):
        from_mapping({"finetune": {"follows": follows}, **base}, ["model.name=coatnet_3"], check_data=False)
    with pytest.raises(ConfigError, match=r"finetune\.follows: .*config file not found"):
        from_mapping({"finetune": {"follows": str(tmp_path / "none.yaml")}, **base}, check_data=False)
    # In an override the path is the user's, relative to the working directory.
    monkeypatch.chdir(REPO)
    c = load_finetune_config(REPO / "configs/finetune/coatnet_2_in21k_to_in1k_384.yaml",
                             ["finetune.follows=configs/pretrain/coatnet_4_in21k.yaml", "model.name=coatnet_4"],
                             check_data=False)
    assert c.finetune.pretrained == "runs/coatnet_4_in21k"
