"""``data.num_canonical_nodes`` against the world: streaming needs it and the number of nodes to divide one another,
and every node to hold the same number of ranks; checked at launch (the elastic range of Ray Train included) and
by the ranks before any compute."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.launch_options import RayOptions
from pipeline.train.config import ConfigError, check_canonical_nodes, load_config, node_count_problem
from pipeline.train.launcher import _check_elastic, launch
from pipeline.train.trainer import check_nodes

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
DEMO = CONFIGS / "demo.yaml"


def _cfg(*overrides: str):
    return load_config(DEMO, list(overrides), check_data=False)


def test_the_node_count_and_num_canonical_nodes_must_divide_one_another():
    assert node_count_problem(64, 8 * 8, 8) is None  # 8 nodes divide 64
    assert node_count_problem(8, 128 * 8, 8) is None  # 128 nodes are a multiple of 8
    assert node_count_problem(64, 3, 3) is None  # one node
    assert "do not divide one another" in node_count_problem(64, 3 * 8, 8)  # 3 nodes
    assert "do not divide one another" in node_count_problem(8, 12 * 8, 8)  # 12 nodes: neither way
    assert "spread evenly" in node_count_problem(64, 12, 8)  # 8 + 4 ranks
    with pytest.raises(ConfigError, match=r"^data\.num_canonical_nodes: 64 and the 3 nodes"):
        check_canonical_nodes(_cfg("data.num_canonical_nodes=64"), 24, 8)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("coatnet_*.yaml")))
def test_the_large_recipes_run_on_1_to_64_nodes_in_powers_of_two(recipe):
    cfg = load_config(CONFIGS / recipe, check_data=False)
    for nodes in (1, 2, 4, 8, 16, 32, 64, 128):
        check_canonical_nodes(cfg, nodes * 8, 8)
    with pytest.raises(ConfigError, match="data.num_canonical_nodes"):
        check_canonical_nodes(cfg, 3 * 8, 8)


def test_each_rank_checks_its_world_before_any_compute():
    cfg = _cfg("data.num_canonical_nodes=64")

    def ctx(world: int, local_sizes: list[int]):
        return SimpleNamespace(world_size=world, local_world_size=local_sizes[0],
                               gather=lambda rows: local_sizes)  # every rank's [local_world_size]

    check_nodes(cfg, ctx(16, [8] * 16))
    with pytest.raises(ConfigError, match=r"data\.num_canonical_nodes: the 12 ranks are spread unevenly over the "
                                          r"nodes \(4 / 8 ranks on a node\)"):
        check_nodes(cfg, ctx(12, [8] * 8 + [4] * 4))
    with pytest.raises(ConfigError, match="data.num_canonical_nodes: 64 and the 3 nodes"):
        check_nodes(cfg, ctx(24, [8] * 24))


def test_an_elastic_range_that_can_restart_on_an_unusable_size_is_refused():
    cfg = _cfg("data.num_canonical_nodes=64", "train.global_batch_size=1024", "train.micro_batch_size=null")
    _check_elastic(cfg, 1, 8, 8)  # one node: any size from 1 to 8 workers
    _check_elastic(cfg, 128, 128, 8)  # fixed size
    with pytest.raises(ConfigError, match=r"data\.num_canonical_nodes: Ray Train may restart on any of 64\.\.128 "
                                          r"workers.* over 65, 66"):
        _check_elastic(cfg, 64, 128, 8)  # 65 workers: 8 nodes of 8 and one of 1
    with pytest.raises(ConfigError, match="workers_per_node"):
        _check_elastic(cfg, 64, 128, None)  # the restart sizes cannot be checked
    # One worker per node: 1, 2 and 4 nodes divide 64, 3 does not.
    _check_elastic(cfg, 1, 2, 1)
    with pytest.raises(ConfigError, match=r"over 3 of them"):
        _check_elastic(cfg, 2, 4, 1)


def test_launch_refuses_a_ray_world_streaming_cannot_split_before_starting_anything(masked_shards, tmp_path):
    overrides = [f"data.root={masked_shards}", f"output_dir={tmp_path}", "data.num_canonical_nodes=64",
                 "train.global_batch_size=48", "train.micro_batch_size=null", "model.num_classes=4"]
    with pytest.raises(ConfigError, match="data.num_canonical_nodes: 64 and the 3 nodes"):
        launch(DEMO, overrides, launcher="ray", ray=RayOptions(num_workers=24, workers_per_node=8))
    assert not Path(tmp_path, "config.yaml").exists()  # refused before the run was set up
