"""The trainer's overhead: its training step (DeepSpeed engine, ZeRO, finiteness check) against a plain
PyTorch step (forward, loss, backward, AdamW), same model, same batches, same process.

Both sides see an identical in-memory batch, so data loading is excluded: this isolates what the
trainer adds per step (including its normalisation of the loader's uint8 pixels on the device). Reported: median step time, images/s, achieved TFLOP/s (6 x analytic MACs),
the ratio trainer / plain images/s, and the host reads of device values per optimizer step (``item``,
``tolist``, ``bool``/``float``/``int`` of a tensor: each one a host synchronisation on a GPU), counted
over the whole step, DeepSpeed's own included. With ``--accum N`` a step is N micro-batches; the
trainer's reads must not grow with N (one finiteness decision per step, the loss stays on the device).

    python benchmarks/train_overhead.py                                   # CPU: coatnet_pico @ 32, batch 64
    python benchmarks/train_overhead.py --batch 16 --accum 4              # CPU: 4 micro-batches of 16 per step
    python benchmarks/train_overhead.py --model coatnet_2 --img-size 224 --batch 128 --zero 2   # one GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import coatnet  # noqa: E402
from pipeline.train.config import TrainConfig, from_dict, make_plan  # noqa: E402
from pipeline.train.device_input import normalize, to_device  # noqa: E402
from pipeline.train.distributed import setup_distributed  # noqa: E402
from pipeline.train.engine import build_model, initialize, input_dtype  # noqa: E402
from pipeline.train.loss import build_loss  # noqa: E402
from pipeline.train.step import TrainStep  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def count_host_reads(fn, n: int) -> float:
    """Calls of the tensor methods that copy a device value to the host, per call of ``fn``."""
    count = 0
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counting(original):
        def read(self, *args, **kwargs):
            nonlocal count
            count += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        for _ in range(n):
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count / n


def profile(fn, n: int, top: int) -> str:
    """torch.profiler table of ``n`` calls of ``fn``: the ops (and DeepSpeed's record_function ranges) by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        _sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def make_trainer_step(engine, loss_fn, dtype, ctx, plan, cfg):
    # The trainer's own input step (Trainer.inputs): uint8 pixels normalised on the device.
    return TrainStep(engine, loss_fn, lambda b: to_device(b, ctx.device, dtype, cfg, mix_classes=plan.num_classes),
                     grad_accum_steps=plan.grad_accum_steps, all_true=ctx.all_true, device=ctx.device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="coatnet_pico")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="micro-batch size")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (the launcher runs each rank with OMP_NUM_THREADS=1; more oversubscribe a busy host)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also torch.profiler both steps and print the top N ops by self time of each (where it goes)")
    p.add_argument("--ds-extra", default="{}", help="JSON merged into the DeepSpeed config (deepspeed.extra)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(a.threads)

    cfg: TrainConfig = from_dict({
        "data": {"root": "unused"}, "model": {"name": a.model, "img_size": a.img_size, "num_classes": a.classes},
        "train": {"global_batch_size": a.batch * a.accum, "micro_batch_size": a.batch, "max_steps": 10**6},
        "deepspeed": {"zero_stage": a.zero, "extra": json.loads(a.ds_extra)}, "logging": {"mlflow": False},
    })
    ctx = setup_distributed()
    plan = make_plan(cfg, ctx.world_size, train_samples=10**9, num_classes=a.classes)
    dtype = input_dtype(cfg)
    # What the loader delivers (uint8 pixels, NHWC): the trainer's step normalises them on the device; the
    # plain step gets the same images already normalised, so both sides train on identical inputs.
    pixels = torch.randint(0, 256, (a.batch, a.img_size, a.img_size, 3), dtype=torch.uint8)
    labels = torch.randint(0, a.classes, (a.batch,))
    x = normalize(pixels, ctx.device, mean=cfg.augment.mean, std=cfg.augment.std)
    y = labels.to(ctx.device)
    images = a.batch * a.accum  # per optimizer step
    flops = 6 * coatnet.count(a.model, a.img_size, num_classes=a.classes)[1] * images

    # Baseline: the plain step the paper's recipe implies (AdamW, clipping; bf16 autocast on GPU).
    torch.manual_seed(0)
    plain = build_model(cfg, plan).to(ctx.device)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.05, fused=torch.cuda.is_available())
    loss_fn = build_loss(cfg.loss)

    def plain_step() -> None:
        total = torch.zeros((), device=ctx.device)
        for _ in range(a.accum):
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = loss_fn(plain(x), y)
            (loss / a.accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total.item()  # the loss, read once per step

    torch.manual_seed(0)
    engine, _ = initialize(build_model(cfg, plan), cfg, plan)
    batch = {"image": pixels, "label": labels, "idx": torch.arange(a.batch), "key": ["k"] * a.batch}
    batches = iter(lambda: batch, None)
    step = make_trainer_step(engine, loss_fn, dtype, ctx, plan, cfg)

    def trainer_step() -> None:
        step(batches)

    # Interleaved rounds, so that a change in machine load hits both sides alike.
    times: dict[str, list[float]] = {"plain PyTorch step": [], f"trainer (DeepSpeed ZeRO-{a.zero})": []}
    fns = dict(zip(times, (plain_step, trainer_step)))
    for fn in fns.values():
        _time(fn, 0, a.warmup)
    for _ in range(a.rounds):
        for name, fn in fns.items():
            times[name] += _time(fn, a.steps, 0)
    reads = {name: count_host_reads(fn, 2) for name, fn in fns.items()}
    if a.profile and ctx.rank == 0:
        for name, fn in fns.items():
            print(f"--- {name}: top {a.profile} ops by self CPU time over 5 steps")
            print(profile(fn, 5, a.profile))
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        rows.append((name, t, images / t, flops / t / 1e12, reads[name]))
    if ctx.rank == 0:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
        print(f"{a.model} @ {a.img_size}px, {a.accum} x {a.batch} images per step, {dev}, "
              f"{a.rounds} x {a.steps} timed steps each (median)")
        print(f"{'':34s} {'step ms':>9s} {'images/s':>9s} {'TFLOP/s':>8s} {'host reads/step':>16s}")
        for name, t, ips, tf, r in rows:
            print(f"{name:34s} {t * 1e3:9.1f} {ips:9.1f} {tf:8.3f} {r:16.1f}")
        print(f"ratio trainer / plain images/s: {rows[1][2] / rows[0][2]:.3f}")


if __name__ == "__main__":
    main()
