"""Fast checks of the ZeRO-scale pieces that need no process group: the micro-batch layout that keeps
BatchNorm statistics (and so the loss) the same on any world size, and the EMA's arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from streaming.base.partition import get_partitions

from pipeline.train.config import AugmentConfig, ConfigError, load_config
from pipeline.train.data import micro_batches
from pipeline.train.device_input import to_device
from pipeline.train.ema import ShardedEma
from pipeline.train.launcher import _check_elastic


def _step_micro_batches(nodes: int, ranks_per_node: int, *, samples: int = 2048, global_batch: int = 64,
                        micro: int = 4, workers: int = 2, canonical: int = 8, resume_at: int = 0,
                        initial_nodes: int | None = None) -> list[list[tuple[int, ...]]]:
    """Per optimizer step, the sample ids of every micro-batch on every rank, as the trainer forms them:
    streaming deals each rank a batch per step (micro x accumulation), ``micro_batches`` splits it."""
    world = nodes * ranks_per_node
    accum = global_batch // (micro * world)
    parts = get_partitions("orig", samples, canonical, nodes, ranks_per_node, workers, micro * accum, resume_at,
                           initial_nodes)
    per_rank = []
    for node in range(nodes):
        for rank in range(ranks_per_node):
            w = [parts[node, rank, i] for i in range(workers)]
            # The DataLoader takes batches from its workers in turn.
            stream = [w[i % workers][i // workers] for i in range(len(w[0]) * workers)]
            per_rank.append([micro_batches({"idx": torch.as_tensor(b)}, accum) for b in stream])
    steps = min(len(r) for r in per_rank)
    return [sorted(tuple(sorted(m["idx"].tolist())) for r in per_rank for m in r[s]) for s in range(steps)]


def test_micro_batches_are_the_same_on_any_world_size():
    # Uninterrupted on 2 nodes x 4 ranks; the same global batch on 1, 2, 4 ranks or 4 nodes: every micro-batch
    # (what BatchNorm normalises over) holds the same samples, also after resuming mid-epoch on fewer nodes.
    ref = _step_micro_batches(2, 4)
    for nodes, ranks in ((1, 1), (1, 2), (1, 4), (4, 2), (2, 2)):
        assert _step_micro_batches(nodes, ranks) == ref, (nodes, ranks)
    resumed = _step_micro_batches(2, 4, resume_at=640, initial_nodes=2)
    assert _step_micro_batches(1, 2, resume_at=640, initial_nodes=2) == resumed
    # Consecutive micro-batches of a rank (streaming's own batching per micro-batch) would not be.
    per_micro = get_partitions("orig", 2048, 8, 1, 1, 1, 4)[0, 0, 0]
    assert sorted(tuple(sorted(b.tolist())) for b in per_micro[:16]) != ref[0]


def test_a_step_batch_is_split_and_mixed_within_each_micro_batch():
    # The loader yields one uint8 batch per step; the trainer splits it and mixes each micro-batch on the device.
    cfg = SimpleNamespace(augment=AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0), model=SimpleNamespace(overrides={}),
                          seed=0)
    batch = {"image": torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8), "label": torch.arange(8) % 4,
             "idx": torch.arange(8), "key": [str(i) for i in range(8)]}
    for a, m in enumerate(micro_batches(batch, 2)):
        assert m["idx"].tolist() == list(range(a, 8, 2)) and m["key"] == [str(i) for i in range(a, 8, 2)]
        x, y = to_device(m, "cpu", torch.float32, cfg, mix_classes=4)
        assert x.shape == (4, 3, 8, 8) and y.shape == (4, 4)
        # A micro-batch's mixed labels use only its own samples' classes.
        own = {i % 4 for i in range(a, 8, 2)}
        assert set(y.nonzero()[:, 1].tolist()) <= own
        _, plain = to_device(m, "cpu", torch.float32, cfg)
        assert plain.tolist() == [i % 4 for i in range(a, 8, 2)]


def test_ema_without_zero_averages_the_parameters_and_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    engine = SimpleNamespace(zero_optimization=lambda: False, zero_optimization_stage=lambda: 0, optimizer=None,
                             module=model)
    ema = ShardedEma(engine, decay=0.5)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], before + 1.0)  # halfway
    restored = ShardedEma(engine, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))
    with pytest.raises(ValueError, match="does not fit"):
        restored.load_state_dict({"shadow": [torch.zeros(100)] * 3, "num_updates": 0})


def test_elastic_ray_launch_checks_the_smallest_world(capsys):
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"
    cfg = load_config(demo, ["train.global_batch_size=64", "train.micro_batch_size=16"], check_data=False)
    _check_elastic(cfg, 1, 4, 4)  # 1, 2 and 4 ranks split 64 into micro-batches of 16; 3 does not
    assert "restart on 3 workers cannot split train.global_batch_size=64" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        _check_elastic(cfg, 3, 4, 4)
    with pytest.raises(ConfigError, match="min_workers"):
        _check_elastic(cfg, 5, 4, 4)


def test_zero_memory_benchmark_fits_replicated_plus_partitioned():
    """benchmarks/zero_memory.py's summary: the worst rank per configuration, and bytes/param/rank = r + p / N."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "zero_memory.py"
    spec = importlib.util.spec_from_file_location("zero_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    p, base = 1000, 10_000

    def row(world, rank, states, ema=False):
        return {"stage": 3, "world": world, "ema": ema, "rank": rank, "params": p, "base": base,
                "build": base + 1, "build_live": base, "initialize": base + 2, "initialize_live": base,
                "step": base + 3, "states": states, "act_per_image": 5.0, "step_s": 1.0, "ema_s": 0.01,
                "ema_numel": 0}

    rows = [row(1, 0, 6 * p + 20 * p), row(2, 0, 6 * p + 10 * p), row(2, 1, 6 * p + 10 * p - 7),
            row(1, 0, 30 * p, ema=True), row(2, 0, 18 * p, ema=True), row(2, 1, 18 * p, ema=True)]
    s = bench.summarise(rows)
    m = s["model"][3]
    assert m["replicated"] == pytest.approx(6) and m["partitioned"] == pytest.approx(20)
    assert m["ratio_2_to_1"] == pytest.approx(16 / 26)
    assert m["ema_bytes_per_param_n1"] == pytest.approx(4) and m["ema_bytes_per_param_n2"] == pytest.approx(2)
    assert s["ema_cost_ratio_median"] == pytest.approx(0.01)
    assert len(s["table"]) == 4
