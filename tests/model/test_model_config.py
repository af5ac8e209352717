"""Configs: every variant round-trips through dict/JSON/YAML; bad configs fail before anything is built."""

from __future__ import annotations

import pytest

import coatnet
from coatnet import CoAtNetConfig


@pytest.mark.parametrize("name", coatnet.list_models())
def test_round_trip(name: str) -> None:
    cfg = coatnet.get_config(name)
    assert CoAtNetConfig.from_json(cfg.to_json()) == cfg
    assert CoAtNetConfig.from_yaml(cfg.to_yaml()) == cfg
    assert CoAtNetConfig.from_dict(cfg.to_dict()) == cfg
    assert name in repr(cfg)


def test_list_models_has_the_paper_family_and_small_ones() -> None:
    names = coatnet.list_models()
    for n in [f"coatnet_{i}" for i in range(8)] + ["coatnet_pico", "coatnet_nano"]:
        assert n in names


def test_paper_head_sizes_and_mixed_s3() -> None:
    assert {coatnet.get_config(f"coatnet_{i}").head_dim for i in range(5)} == {32}
    assert coatnet.get_config("coatnet_5").head_dim == 64
    for n, (w3m, w3) in {"coatnet_6": (768, 1536), "coatnet_7": (1024, 2048)}.items():
        cfg = coatnet.get_config(n)
        assert cfg.head_dim == 128
        assert (cfg.s3_mbconv_depth, cfg.s3_mbconv_width, cfg.depths[2], cfg.widths[2]) == (8, w3m, 42, w3)


def test_paper_defaults() -> None:
    cfg = coatnet.get_config("coatnet_0")
    assert (cfg.downsample, cfg.pool, cfg.expand_ratio, cfg.se_ratio, cfg.ffn_ratio) == ("eq5", "max", 4.0, 0.25, 4.0)
    assert (cfg.bn_momentum, cfg.bn_eps, cfg.ln_eps, cfg.init_std) == (0.01, 1e-3, 1e-5, 0.02)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"widths": (96, 192, 380, 768)}, "head_dim"),
        ({"pool": "min"}, "pool"),
        ({"downsample": "strided"}, "downsample"),
        ({"depths": (2, 3, 5)}, "4 entries"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"img_size": 16}, "img_size"),
        ({"block_types": ("mbconv", "mbconv", "attention", "transformer")}, "block type"),
        ({"s3_mbconv_depth": 2}, "s3_mbconv"),
    ],
)
def test_invalid_configs_rejected(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        coatnet.get_config("coatnet_0").replace(**changes)


def test_unknown_keys_named() -> None:
    with pytest.raises(ValueError, match="depht"):
        coatnet.create_model("coatnet_pico", depht=3)
    with pytest.raises(ValueError, match="colour"):
        CoAtNetConfig.from_dict({**coatnet.get_config("coatnet_0").to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="unknown CoAtNet variant 'coatnet_9'"):
        coatnet.create_model("coatnet_9")


def test_create_model_overrides_reach_the_config() -> None:
    m = coatnet.create_model("coatnet_pico", num_classes=7, img_size=(48, 64), drop_path_rate=0.1, pool="avg")
    assert (m.config.num_classes, m.config.img_size, m.config.drop_path_rate, m.config.pool) == (7, (48, 64), 0.1, "avg")
    assert m.num_classes == 7
    # a config object works as well as a name
    m2 = coatnet.create_model(m.config)
    assert m2.config == m.config
