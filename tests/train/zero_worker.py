"""One rank of the ZeRO component checks (started by tests/train/test_zero_components.py under torchrun).

Rank 0 writes what it measured to ``{out}/results.json``; the test asserts on it. Checks:
- ``init``: the ZeRO-3 build is partitioned (no rank holds a whole parameter) and gathers to the weights of
  an unpartitioned build with the same seed; ``model.init_weights`` (a file of another resolution) loads into
  the partitions as it loads into a whole model.
- ``ema_<stage>``: the sharded EMA, updated without any collective, consolidated by DeepSpeed's zero_to_fp32
  from the checkpoint, equals a reference EMA of the gathered fp32 master weights; it reloads from the
  checkpoint and from the universal checkpoint with the same partitions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import coatnet
from pipeline import models
from pipeline.train.checkpoint import CheckpointManager, convert_to_universal
from pipeline.train.config import load_config, make_plan
from pipeline.train.distributed import setup_distributed
from pipeline.train.ema import ShardedEma, consolidate_ema
from pipeline.train.engine import build_model, initialize

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
NUM_CLASSES = 10


def config(out: Path, stage: int, *extra: str):
    return load_config(DEMO, [
        "model.name=coatnet_pico", "model.img_size=32", "model.drop_path_rate=0.0", f"deepspeed.zero_stage={stage}",
        "deepspeed.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=2", "optim.lr=1e-2",
        "schedule.warmup_steps=0", "schedule.warmup_epochs=0", f"output_dir={out}", "ema.decay=0.5", *extra,
    ], check_data=False)


def plan_for(cfg, world: int):
    return make_plan(cfg, world, train_samples=64, num_classes=NUM_CLASSES)


def gathered(model) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.detach().clone()
    return out


def check_init(out: Path, world: int, rank: int) -> dict:
    cfg = config(out, 3)
    plan = plan_for(cfg, world)
    torch.manual_seed(cfg.seed)
    ref = coatnet.create_model("coatnet_pico", num_classes=NUM_CLASSES, img_size=32)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, plan)
    params = list(model.named_parameters())
    partitioned = all(hasattr(p, "ds_id") and p.data.numel() == 0 and p.ds_tensor.numel() == -(-p.ds_numel // world)
                      for _, p in params)
    held = sum(p.ds_tensor.numel() for _, p in params)
    got = gathered(model)
    ref_sd = ref.state_dict()
    mismatched = [n for n, t in got.items() if not torch.equal(t, ref_sd[n])]
    mismatched += [n for n, b in model.named_buffers() if n in ref_sd and not torch.equal(b, ref_sd[n])]

    # model.init_weights: a file written at 64x64 (other table sizes) and with other values (another seed).
    src = out / "init64.safetensors"
    if rank == 0:
        from safetensors.torch import save_file

        torch.manual_seed(123)
        save_file(coatnet.create_model("coatnet_pico", num_classes=NUM_CLASSES, img_size=64).state_dict(), str(src))
    dist.barrier()
    from safetensors.torch import load_file

    whole = coatnet.create_model("coatnet_pico", num_classes=NUM_CLASSES, img_size=32)
    whole.load_state_dict(load_file(str(src)))  # the model's hook resizes the tables
    torch.manual_seed(cfg.seed)
    loaded = build_model(config(out, 3, f"model.init_weights={src}"), plan)
    want = whole.state_dict()
    got = gathered(loaded)
    init_mismatched = [n for n, t in got.items() if not torch.allclose(t, want[n], rtol=0, atol=1e-7)]
    init_mismatched += [n for n, b in loaded.named_buffers() if n in want and not torch.equal(b, want[n])]
    return {"partitioned": partitioned, "held_elements": held, "total_elements": sum(p.ds_numel for _, p in params),
            "mismatched": mismatched, "init_weights_mismatched": init_mismatched,
            "tables_resized": any(t.shape != want[n].shape for n, t in load_file(str(src)).items())}


def check_init_timm(out: Path, world: int) -> dict:
    """A timm model under ZeRO-3: built whole (its init cannot run on partitions), then partitioned."""
    peer = load_config(REPO / "configs" / "pretrain" / "demo_timm_maxxvit.yaml", check_data=False).model
    cfg = config(out, 3, f"model.name={peer.name}", f"model.overrides={json.dumps(peer.overrides)}")
    torch.manual_seed(cfg.seed)
    ref = models.create_model(peer.name, num_classes=NUM_CLASSES, img_size=32, overrides=peer.overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, plan_for(cfg, world))
    params = list(model.named_parameters())
    ref_sd = ref.state_dict()
    return {"partitioned": all(hasattr(p, "ds_id") and p.data.numel() == 0 for _, p in params),
            "mismatched": [n for n, t in gathered(model).items() if not torch.equal(t, ref_sd[n])]}


class _NoCollectives:
    """Every collective raises while active: the EMA update must not communicate."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single", "barrier", "reduce", "gather", "scatter")

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

        def refuse(*_a, **_k):
            raise AssertionError("a collective during the EMA update")

        for n in self.NAMES:
            setattr(dist, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


def check_ema(out: Path, world: int, rank: int, stage: int, steps: int = 4) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = config(out / f"z{stage}", stage)
    plan = plan_for(cfg, world)
    torch.manual_seed(cfg.seed)
    engine, _ = initialize(build_model(cfg, plan), cfg, plan)
    ema = ShardedEma(engine, cfg.ema.decay)

    def full_fp32() -> dict[str, torch.Tensor]:  # collective: every rank
        return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}

    reference = full_fp32()
    d = cfg.ema.decay
    for step in range(steps):
        for micro in range(plan.grad_accum_steps):
            g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
            x = torch.randn(plan.micro_batch_size, 3, 32, 32, generator=g)
            y = torch.randint(0, NUM_CLASSES, (plan.micro_batch_size,), generator=g)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()
        with _NoCollectives():
            ema.update()
        master = full_fp32()
        reference = {n: d * reference[n] + (1 - d) * master[n] for n in master}

    ckpts = CheckpointManager(out / f"z{stage}" / "checkpoints", keep_last=2, upload_uri=None, rank=rank,
                              local_rank=rank)
    step_dir = ckpts.save(engine, steps, {"train_state": {}}, config_hash="h", world_size=world, ema=ema)
    res: dict = {"ema_numel": ema.numel, "model_numel": sum(t.numel() for t in master.values())}
    if rank == 0:
        exported = consolidate_ema(step_dir)
        res["max_abs_diff"] = max((exported[n] - reference[n]).abs().max().item() for n in reference)
        res["max_abs_ema_minus_weights"] = max((exported[n] - master[n]).abs().max().item() for n in master)
        res["keys_match"] = sorted(exported) == sorted(engine.module.state_dict())
        convert_to_universal(step_dir)
    dist.barrier()
    again = ShardedEma(engine, cfg.ema.decay)
    again.load(step_dir)
    res["reload_equal"] = all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))
    res["reload_updates"] = again.num_updates
    universal = ShardedEma(engine, cfg.ema.decay)
    universal.load_universal(step_dir / "universal")
    res["universal_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(universal.shadow, ema.shadow))
    res["universal_updates"] = universal.num_updates
    return res


def main(out: str) -> int:
    ctx = setup_distributed()
    path = Path(out)
    results = {"world_size": ctx.world_size, "init": check_init(path, ctx.world_size, ctx.rank),
               "init_timm": check_init_timm(path, ctx.world_size)}
    for stage in (2, 3):
        results[f"ema_{stage}"] = check_ema(path, ctx.world_size, ctx.rank, stage)
    if ctx.rank == 0:
        (path / "results.json").write_text(json.dumps(results, indent=2))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
