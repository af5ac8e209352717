"""Does this project's CoAtNet learn as well as timm's MaxxVit of the same shape, trained the same way?

Rows (``--rows``), each run for every seed and every epoch budget in ``--epochs``:

* ``plain``: this project's model in one single-process PyTorch loop (no DeepSpeed, no loader workers):
  AdamW (lr 1e-3, weight decay 0.05 on weights only), 10% linear warm-up then linear decay to 0,
  label smoothing 0.1, batch 64, eval after every epoch. The digits under 4 rotations (40 classes;
  the held-out handwriting samples of ``pipeline.data.digits`` as val) are rendered once at ``--img-size``
  and kept in memory. It tells a model problem from a trainer problem.
* ``plain-timm``: timm's peer in the same loop.

Not built yet (issue 22, item 2): the ``coatnet pretrain`` rows (``model.name=timm/<name>`` with
``model.overrides.*``, once that lands), the coatnet_0 vs ``coatnet_0_224`` row, EMA and the PNG.

The peer of ``coatnet_pico`` is timm's paper-intended CoAtNet config (``coatnet_0_224``: GELU, MBConv
expansion from the output width, expansion in the attention's qkv) overlaid with pico's shape: widths
(24, 32, 64, 128), depths (1, 1, 1, 1), C-C-T-T, stem 16, head size 16, and the plain pooled-LN head
(no 768-wide pre-logits layer) so the two heads have the same parameters.

Printed per row and budget: top-1 and final training loss (mean ± std over seeds), CPU-seconds per run.

    python benchmarks/train_parity.py --rows plain plain-timm --epochs 6 12 --seeds 0 1 2
    python benchmarks/train_parity.py --rows plain --epochs 6 --seeds 0 --set downsample=strided_dwconv
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import coatnet  # noqa: E402
from pipeline.data import digits  # noqa: E402

ROTATIONS = 4
NUM_CLASSES = digits.NUM_DIGITS * ROTATIONS
PICO_SHAPE = dict(embed_dim=(24, 32, 64, 128), depths=(1, 1, 1, 1), stem_width=16, transformer_dim_head=16)
TIMM_PEER = "coatnet_0_224"
# head_hidden_size=0 (timm drops None kwargs, which would keep the 768-wide layer): timm's plain norm -> pool -> fc head (coatnet_0_224's own adds a 768-wide tanh layer)
TIMM_PICO_OVERRIDES = dict(PICO_SHAPE, head_hidden_size=0)


# --- data ------------------------------------------------------------------------------------------
def digits_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): uint8 (N, 3, size, size) images of every digit under 4 rotations."""
    xs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    ys: dict[str, list[int]] = {"train": [], "val": []}
    for index in range(digits.num_samples()):
        split = digits.split_of(index)
        for rot in range(ROTATIONS):
            img = Image.open(io.BytesIO(digits.render(index, rot, size)))
            xs[split].append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            ys[split].append(digits.label_of(index, rot, ROTATIONS))
    out = []
    for split in ("train", "val"):
        out += [torch.from_numpy(np.stack(xs[split])), torch.tensor(ys[split])]
    return tuple(out)  # type: ignore[return-value]


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(127.5).sub_(1.0)  # the demo recipe's mean = std = 0.5


# --- models ----------------------------------------------------------------------------------------
def parse_sets(items: list[str]) -> dict[str, object]:
    """``key=value`` pairs, values read as JSON where they parse (numbers, lists, booleans), else strings."""
    out: dict[str, object] = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_ours(name: str, img_size: int, **overrides: object) -> nn.Module:
    return coatnet.create_model(name, num_classes=NUM_CLASSES, img_size=img_size, **overrides)


def build_timm(name: str, img_size: int, **overrides: object) -> nn.Module:
    import timm  # lazy: slow to import, and only the timm rows need it

    return timm.create_model(name, num_classes=NUM_CLASSES, img_size=img_size, **overrides)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: not on norms, biases or relative-position tables."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in skip or any(n.endswith(s) for s in skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear(total: int, warmup_frac: float) -> Callable[[int], float]:
    warm = max(1, round(warmup_frac * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(normalise(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return correct / len(x)


def plain_run(
    build: Callable[[], nn.Module],
    data: tuple[torch.Tensor, ...],
    seed: int,
    epochs: int,
    *,
    batch: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_frac: float = 0.1,
    label_smoothing: float = 0.1,
    max_steps: int | None = None,
    eval_every_epoch: bool = True,
) -> dict:
    """One run of the plain loop; returns per-epoch top-1, final loss and CPU seconds."""
    x_tr, y_tr, x_va, y_va = data
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    steps_per_epoch = math.ceil(len(x_tr) / batch)
    total = max_steps or epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total, warmup_frac))
    gen = torch.Generator().manual_seed(seed)
    cpu0, step, curve, losses = time.process_time(), 0, [], []
    model.train()
    while step < total:
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(normalise(x_tr[idx])), y_tr[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        if eval_every_epoch or step >= total:
            curve.append(top1(model, x_va, y_va))
    tail = losses[-min(len(losses), 10):]
    return {"top1": curve[-1], "curve": curve, "loss": sum(tail) / len(tail),
            "cpu_s": time.process_time() - cpu0, "steps": total}


# --- reporting -------------------------------------------------------------------------------------
def mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(v: list[float]) -> str:
    m, s = mean_std(v)
    return f"{m:.3f} ± {s:.3f}" if len(v) > 1 else f"{m:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["plain", "plain-timm"],
                    choices=["plain", "plain-timm"])
    ap.add_argument("--epochs", nargs="+", type=int, default=[6, 12])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--model", default="coatnet_pico", help="this project's variant (plain/pipeline rows)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="CoAtNetConfig overrides for this project's model (ablations)")
    ap.add_argument("--timm-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra timm.create_model kwargs for the peer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = digits_tensors(args.img_size)
    ours_set, timm_set = parse_sets(args.set), parse_sets(args.timm_set)
    builders = {
        "plain": lambda: build_ours(args.model, args.img_size, **ours_set),
        "plain-timm": lambda: build_timm(TIMM_PEER, args.img_size, **TIMM_PICO_OVERRIDES, **timm_set),
    }
    results: dict[str, dict[int, list[dict]]] = {}
    for row in args.rows:
        results[row] = {}
        for epochs in args.epochs:
            results[row][epochs] = []
            for seed in args.seeds:
                r = plain_run(builders[row], data, seed, epochs)
                results[row][epochs].append(r)
                print(f"  {row:<14} ep={epochs:<3} seed={seed} top1={r['top1']:.4f} loss={r['loss']:.3f} "
                      f"cpu={r['cpu_s']:.0f}s curve={[round(c, 3) for c in r['curve']]}", flush=True)
    report(results, args)


def report(results: dict[str, dict[int, list[dict]]], args: argparse.Namespace) -> None:
    print(f"\n{'row':<14} {'epochs':>6} {'seeds':>5}  {'top-1':>13}  {'EMA top-1':>13}  {'final loss':>13}  cpu-s/run")
    for row, by_ep in results.items():
        for epochs, runs in by_ep.items():
            ema = [r["ema_top1"] for r in runs if r.get("ema_top1") is not None]
            print(f"{row:<14} {epochs:>6} {len(runs):>5}  {fmt([r['top1'] for r in runs]):>13}  "
                  f"{fmt(ema) if ema else '-':>13}  {fmt([r['loss'] for r in runs]):>13}  "
                  f"{statistics.median(r['cpu_s'] for r in runs):.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
