"""Masked samples (duplicates the sharding job found across its parts after writing their shards, listed in the
manifest's ``splits[s]["masked"]``): they stay in the stream, so that streaming's order, its resume state and the
batch shapes do not change, and weigh nothing: the loss of an optimizer step is the mean over its kept samples,
on any split into micro-batches and ranks, and the sample counts count kept samples only."""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from train_helpers import tiny

from pipeline.artifacts import Manifest, read_manifest
from pipeline.data.manifest import is_kept, load_manifest, masked_indices
from pipeline.train import launch
from pipeline.train.config import load_config, make_plan
from pipeline.train.data import build_eval_loader, build_train_loader
from pipeline.train.loss import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from pipeline.train.step import TrainStep
from pipeline.train.streaming_shm import dataset_prefix, release_deleted_dataset


def _masked_keys(root: str, split: str) -> set[str]:
    return {q["key"] for q in load_manifest(root)["quarantined"]
            if q["kind"] == "duplicate" and f"still in the {split} shards" in q["reason"]}


def test_masked_indices_come_sorted_and_compact_and_is_kept_tells_them_apart():
    manifest = Manifest.model_validate(
        {"num_classes": 2, "splits": {"train": {"samples": 10, "masked": [7, 2, 5]}, "val": {"samples": 3, "masked": []}}})
    masked = masked_indices(manifest, "train")
    assert masked.dtype == np.int64 and masked.tolist() == [2, 5, 7]
    assert is_kept(masked, np.arange(10)).tolist() == [i not in (2, 5, 7) for i in range(10)]
    assert bool(is_kept(masked, 7)) is False and bool(is_kept(masked, 9)) is True  # past the last masked index
    assert masked_indices(manifest, "val").size == 0 and is_kept(masked_indices(manifest, "val"), [0, 1]).all()
    assert masked_indices(Manifest(num_classes=2), "minival").size == 0  # a manifest from before masking


@pytest.mark.parametrize("loss", [SoftmaxCrossEntropy(0.1), SigmoidBinaryCrossEntropy(0.1)])
@pytest.mark.parametrize("soft", [False, True])
def test_the_weighted_loss_is_the_loss_of_the_kept_samples_only(loss, soft):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    target = torch.softmax(torch.randn(8, 5, generator=g), -1) if soft else torch.randint(0, 5, (8,), generator=g)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    got = loss(logits, target, keep, keep.sum())
    torch.testing.assert_close(got, loss(logits[keep], target[keep]))
    all_kept = torch.ones(8, dtype=torch.bool)
    torch.testing.assert_close(loss(logits, target, all_kept, 8), loss(logits, target))


class _Engine:
    """What TrainStep asks of DeepSpeed: ``backward`` divides the loss by the accumulation steps (DeepSpeed's
    default); the gradients of the ranks are averaged by the test, as DeepSpeed's reduction does."""

    def __init__(self, module: nn.Module, accum: int) -> None:
        self.module, self.accum, self.optimizer, self.steps = module, accum, object(), 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.steps += 1

    def was_step_applied(self) -> bool:
        return True


@pytest.mark.parametrize("loss_fn", [SoftmaxCrossEntropy(), SigmoidBinaryCrossEntropy()])
def test_a_step_over_ranks_and_micro_batches_trains_on_the_mean_over_kept_samples(loss_fn):
    ranks, accum, micro = 2, 2, 4
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    # keep: rank 0 loses 1 and 2 samples in its micro-batches, rank 1 loses 3 and 1: 5 and 4 kept (a mean per
    # micro-batch or per rank would weigh the samples unequally).
    keeps = [[[1, 0, 1, 1], [0, 1, 0, 1]], [[0, 0, 1, 0], [1, 1, 1, 0]]]
    batches = [[{"image": torch.randn(micro, 6, generator=g), "label": torch.randint(0, 3, (micro,), generator=g),
                 "keep": torch.tensor(k, dtype=torch.bool)} for k in rank_keeps] for rank_keeps in keeps]
    total_kept = sum(int(b["keep"].sum()) for rank in batches for b in rank)
    grads, losses = [], []
    for rank in range(ranks):
        engine = _Engine(copy.deepcopy(model), accum)
        step = TrainStep(engine, loss_fn, lambda b: (b["image"], b["label"]), grad_accum_steps=accum,
                         all_true=lambda flag: bool(flag), device=torch.device("cpu"),
                         all_sum=lambda t: torch.full_like(t, total_kept), world_size=ranks)
        result = step(iter(batches[rank]))
        assert result.applied and result.images == total_kept and engine.steps == accum
        grads.append([p.grad.clone() for p in engine.module.parameters()])
        losses.append(float(result.loss))
    ref = copy.deepcopy(model)
    kept = [b for rank in batches for b in rank]
    x = torch.cat([b["image"][b["keep"]] for b in kept])
    y = torch.cat([b["label"][b["keep"]] for b in kept])
    want = loss_fn(ref(x), y)
    want.backward()
    # The logged loss (the mean over micro-batches, then over ranks) and the averaged gradient: the kept mean's.
    assert sum(losses) / ranks == pytest.approx(want.item(), rel=1e-5)
    for p, g0, g1 in zip(ref.parameters(), *grads):
        torch.testing.assert_close((g0 + g1) / ranks, p.grad)


def test_with_nothing_masked_a_step_is_the_plain_mean():
    torch.manual_seed(0)
    model, g = nn.Linear(6, 3), torch.Generator().manual_seed(2)
    data = [{"image": torch.randn(4, 6, generator=g), "label": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(2)]
    out = []
    for with_keep in (False, True):
        engine = _Engine(copy.deepcopy(model), 2)
        batches = [{**b, "keep": torch.ones(4, dtype=torch.bool)} if with_keep else b for b in data]
        step = TrainStep(engine, SoftmaxCrossEntropy(), lambda b: (b["image"], b["label"]), grad_accum_steps=2,
                         all_true=lambda flag: bool(flag), device=torch.device("cpu"))
        result = step(iter(batches))
        out.append((float(result.loss), result.images, [p.grad.clone() for p in engine.module.parameters()]))
    (loss0, n0, g0), (loss1, n1, g1) = out
    assert n0 == n1 == 8 and loss0 == pytest.approx(loss1, rel=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def _loader_config(root: str, out: Path):
    recipe = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"
    cfg = load_config(recipe, [f"data.root={root}", f"output_dir={out}", "data.num_workers=0",
                               "data.clean_stale_shared_memory=false", "model.img_size=32",
                               "train.global_batch_size=16", "train.micro_batch_size=16", "eval.batch_size=16",
                               "logging.mlflow=false", "schedule.warmup_epochs=0"], check_data=True)
    return cfg, make_plan(cfg, 1, with_counts=False)


def test_the_loaders_flag_exactly_the_masked_samples_and_keep_the_shapes(masked_shards, tmp_path):

    cfg, plan = _loader_config(masked_shards, tmp_path)
    manifest = read_manifest(masked_shards)
    for build, split in ((build_train_loader, "train"), (build_eval_loader, "minival")):
        loader = build(cfg, plan) if build is build_train_loader else build(cfg)
        batches = list(loader)
        keys = [k for b in batches for k in b["key"]]
        keep = torch.cat([b["keep"] for b in batches])
        idx = torch.cat([b["idx"] for b in batches]).numpy()
        assert keep.dtype == torch.bool
        assert keep.tolist() == is_kept(masked_indices(manifest, split), idx).tolist()
        # The masked indices are the duplicates the manifest names, and they are still read (static shapes).
        assert {k for k, kept in zip(keys, keep.tolist()) if not kept} == _masked_keys(masked_shards, split)
        if split == "train":
            assert all(b["image"].shape[0] == 16 for b in batches)
        prefix = dataset_prefix(loader.dataset)
        del loader, batches
        gc.collect()
        release_deleted_dataset(prefix)


# -- end to end: the trainer on a dataset with masked samples, resumed on another world size ----------------------

MASKED_RUN = ["model.num_classes=4", "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_steps=4",
              "logging.interval_steps=1", "eval.interval_steps=4", "eval.max_samples=null", "eval.batch_size=16",
              "checkpoint.interval_steps=100", "train.record_samples=true", "model.drop_path_rate=0.0",
              "deepspeed.zero_stage=1"]


def _rows(out: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()):
        rows.setdefault(r["step"], {}).update(r)
    return rows


def _recorded_keys(out: Path) -> list[str]:
    last: dict[tuple[int, int, str], list[str]] = {}
    for f in sorted(Path(out, "samples").glob("rank*.jsonl")):
        for r in map(json.loads, f.read_text().splitlines()):
            last[(r["step"], r["micro"], f.name)] = r["keys"]
    return [k for keys in last.values() for k in keys]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_on_masked_samples_counts_kept_ones_and_resumes_on_another_world_size(masked_shards, recipe,
                                                                                     tmp_path):
    ref = launch(recipe, tiny(masked_shards, tmp_path / "ref", *MASKED_RUN), launcher="local", nproc=2)
    out = tmp_path / "resumed"
    mine = tiny(masked_shards, out, *MASKED_RUN)
    a = launch(recipe, [*mine, "train.stop_after_steps=2"], launcher="local", nproc=2, resume="none")
    b = launch(recipe, mine, launcher="local", nproc=1, resume="auto")
    assert ref.finished and (a.step, b.step) == (2, 4) and b.finished
    want, got = _rows(ref.output_dir), _rows(out)
    for step in range(1, 5):
        # The kept samples' mean loss: the same on 2 ranks as on 1 (accumulating 2 micro-batches), though the
        # ranks and micro-batches hold different numbers of kept samples.
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4, abs=1e-5), step
        assert got[step]["samples_seen"] == want[step]["samples_seen"]
    masked_train = _masked_keys(masked_shards, "train")
    recorded = _recorded_keys(ref.output_dir)
    assert len(recorded) == 4 * 16 and any(k in masked_train for k in recorded)
    assert want[4]["samples_seen"] == sum(k not in masked_train for k in recorded)
    assert sorted(_recorded_keys(out)) == sorted(recorded)
    # The in-training evaluation scores each minival image once.
    minival = load_manifest(masked_shards)["splits"]["minival"]
    assert want[4]["eval_samples"] == got[4]["eval_samples"] == minival["samples"] - len(minival["masked"])
