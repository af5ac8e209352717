"""Does this project's CoAtNet learn as well as timm's MaxxVit of the same shape, trained the same way?

One recipe, ``configs/pretrain/parity_digits64.yaml`` (the demo's, at 64 px, augmentation off, AdamW lr 1e-3
with weight decay 0.05 on weights only, 10% warm-up then linear decay, label smoothing 0.1, batch 64, clip 1.0,
EMA 0.99), the digits under 4 rotations (40 classes; the held-out handwriting, 1437 x 4 images, as ``val``).
Rows (``--rows``), each run for every seed and every epoch budget in ``--epochs``:

* ``pipeline`` / ``pipeline-timm``: ``coatnet pretrain`` on one rank (DeepSpeed ZeRO-2, the streaming loader
  over shards that ``coatnet shard`` writes once), then ``coatnet evaluate --weights raw,ema`` on ``val``; the
  peer is ``model.name=timm/coatnet_0_224`` with ``model.overrides`` (``demo_timm_maxxvit.yaml``'s).
* ``plain`` / ``plain-timm``: the same recipe in one single-process PyTorch loop (no DeepSpeed, no loader:
  images rendered once, in memory), with torch's own EMA (``swa_utils``): a model problem told from a
  trainer problem.
* ``c0`` / ``c0-timm`` (``--c0-steps``, one seed): coatnet_0 against timm's ``coatnet_0_224`` (head without its
  pre-logits layer) in the plain loop, at 64 px, for a few steps: full-size blocks compared too.

The peer of ``coatnet_pico`` is timm's paper-intended CoAtNet config (``coatnet_0_224``: GELU, MBConv expansion
from the output width, expansion in the attention's qkv) overlaid with pico's shape: widths (24, 32, 64, 128),
depths (1, 1, 1, 1), C-C-T-T, stem 16, head size 16, and the plain pooled-LN head.

Printed per row and budget: top-1 raw and EMA, final training loss (mean ± std over seeds), CPU-seconds per run
(the child processes' for the pipeline rows). ``--png`` writes the curves (eval top-1 per epoch, mean with a
min-max band over seeds); ``--json`` the runs, and ``--report A.json B.json ...`` merges runs made apart (e.g.
two invocations side by side on two cores) into one table and one PNG.

    python benchmarks/train_parity.py --rows pipeline plain --epochs 6 12 --seeds 0 1 2 --json ours.json
    python benchmarks/train_parity.py --rows pipeline-timm --epochs 6 12 --seeds 0 1 2 --json timm.json
    python benchmarks/train_parity.py --report ours.json timm.json --png parity.png
    python benchmarks/train_parity.py --rows c0 c0-timm --c0-steps 60
    python benchmarks/train_parity.py --rows plain --epochs 6 --seeds 0 --set transformer_init=normal
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import coatnet  # noqa: E402
from pipeline.data import digits  # noqa: E402
from pipeline.train.config import load_config  # noqa: E402

ROTATIONS = 4
NUM_CLASSES = digits.NUM_DIGITS * ROTATIONS
PICO_SHAPE = dict(embed_dim=(24, 32, 64, 128), depths=(1, 1, 1, 1), stem_width=16, transformer_dim_head=16)
TIMM_PEER = "coatnet_0_224"
RECIPE = ROOT / "configs" / "pretrain" / "parity_digits64.yaml"
PEER_RECIPE = ROOT / "configs" / "pretrain" / "demo_timm_maxxvit.yaml"  # the peer's model section
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


@dataclass(frozen=True)
class Recipe:
    """What the plain loop takes from the parity recipe (the pipeline rows read the file itself)."""

    lr: float
    weight_decay: float
    warmup_frac: float
    label_smoothing: float
    batch: int
    grad_clip: float
    ema_decay: float | None

    @classmethod
    def read(cls, path: Path) -> Recipe:
        cfg = load_config(path, check_data=False)
        return cls(cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.warmup_epochs / cfg.train.epochs,
                   cfg.loss.label_smoothing, cfg.train.global_batch_size, cfg.optim.grad_clip, cfg.ema.decay)


def plain_run(
    build: Callable[[], nn.Module],
    data: tuple[torch.Tensor, ...],
    seed: int,
    epochs: int,
    recipe: Recipe,
    *,
    max_steps: int | None = None,
    eval_every_epoch: bool = True,
) -> dict:
    """One run of the plain loop; returns per-epoch top-1 (raw), final raw and EMA top-1, final loss, CPU s."""
    x_tr, y_tr, x_va, y_va = data
    torch.manual_seed(seed)
    model = build()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True) \
        if recipe.ema_decay else None
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
    steps_per_epoch = math.ceil(len(x_tr) / recipe.batch)
    total = max_steps or epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total, recipe.warmup_frac))
    gen = torch.Generator().manual_seed(seed)
    cpu0, step, curve, losses = time.process_time(), 0, [], []
    model.train()
    while step < total:
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), recipe.batch):
            idx = order[i:i + recipe.batch]
            loss = F.cross_entropy(model(normalise(x_tr[idx])), y_tr[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        if eval_every_epoch or step >= total:
            curve.append(top1(model, x_va, y_va))
    tail = losses[-min(len(losses), 10):]
    return {"top1": curve[-1], "ema_top1": top1(ema, x_va, y_va) if ema is not None else None, "curve": curve,
            "loss": sum(tail) / len(tail), "cpu_s": time.process_time() - cpu0, "steps": total}


# --- the pipeline rows -----------------------------------------------------------------------------
def coatnet_cli(*args: str, threads: int) -> str:
    """``coatnet ARGS`` in a child process (this checkout's code), its stdout; a failure is the benchmark's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"coatnet {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                         f"{done.stderr[-4000:]}")
    return done.stdout


def ensure_shards(root: Path, img_size: int, threads: int) -> Path:
    """digits21k at ``img_size``, all of train kept for training (the plain loop's images), written once."""
    if not (root / "LATEST").is_file():
        coatnet_cli("shard", "--source", f"digits21k:size={img_size}", "--out", str(root), "--minival-fraction",
                    "0", "--local", "--no-progress", threads=threads)
    return root


def pipeline_run(recipe_path: Path, shards: Path, out: Path, seed: int, epochs: int, *, threads: int,
                 overrides: list[str]) -> dict:
    """``coatnet pretrain`` (one rank) then ``coatnet evaluate`` (raw and EMA) of one seed and budget."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    coatnet_cli("pretrain", "--config", str(recipe_path), "--nproc", "1", "--resume", "none",
                f"seed={seed}", f"train.epochs={epochs}", f"schedule.warmup_epochs={0.1 * epochs:g}",
                f"output_dir={out}", f"data.root={shards}", *overrides, threads=threads)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(coatnet_cli("evaluate", "--model", str(out), "--data", str(shards), "--split", "val",
                                    "--weights", "raw,ema", "--json", "--no-mlflow", "--workers", "0",
                                    threads=threads))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [r["eval_top1"] for r in rows if "eval_top1" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    w = report["weights"]
    return {"top1": w["raw"]["top1"], "ema_top1": w["ema"]["top1"], "curve": curve, "loss": losses[-1],
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "steps": max((r.get("step", 0) for r in rows), default=0)}


# --- reporting -------------------------------------------------------------------------------------
def mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(v: list[float]) -> str:
    m, s = mean_std(v)
    return f"{m:.3f} ± {s:.3f}" if len(v) > 1 else f"{m:.3f}"


ROWS = ("pipeline", "pipeline-timm", "plain", "plain-timm", "c0", "c0-timm")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["pipeline", "pipeline-timm", "plain"], choices=ROWS)
    ap.add_argument("--epochs", nargs="+", type=int, default=[6, 12])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--img-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--model", default="coatnet_pico", help="this project's variant (plain/pipeline rows)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="CoAtNetConfig overrides for this project's model (ablations; plain rows)")
    ap.add_argument("--timm-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra timm.create_model kwargs for the peer (plain rows)")
    ap.add_argument("--c0-steps", type=int, default=60, help="optimizer steps of the c0 rows")
    ap.add_argument("--c0-batch", type=int, default=32)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "parity", help="shards and run directories")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="JSON",
                    help="merge the runs of earlier --json files; train nothing")
    args = ap.parse_args(argv)
    if args.report:
        results: dict[str, dict[str, list[dict]]] = {}
        for f in args.report:
            for row, by_ep in json.loads(f.read_text()).items():
                for ep, runs in by_ep.items():
                    results.setdefault(row, {}).setdefault(ep, []).extend(runs)
        report(results, args)
        return
    torch.set_num_threads(args.threads)
    recipe = Recipe.read(args.recipe)
    img_size = args.img_size or load_config(args.recipe, check_data=False).model.img_size
    peer = load_config(PEER_RECIPE, check_data=False).model
    peer_overrides = [f"model.name={peer.name}", f"model.overrides={json.dumps(peer.overrides)}"]
    data = digits_tensors(img_size) if any(not r.startswith("pipeline") for r in args.rows) else None
    shards = ensure_shards(args.work / f"shards-{img_size}", img_size, args.threads) \
        if any(r.startswith("pipeline") for r in args.rows) else None
    ours_set, timm_set = parse_sets(args.set), parse_sets(args.timm_set)
    c0_recipe = dataclasses.replace(recipe, batch=args.c0_batch)
    builders = {
        "plain": lambda: build_ours(args.model, img_size, **ours_set),
        "plain-timm": lambda: build_timm(TIMM_PEER, img_size, **TIMM_PICO_OVERRIDES, **timm_set),
        "c0": lambda: build_ours("coatnet_0", img_size, **ours_set),
        "c0-timm": lambda: build_timm(TIMM_PEER, img_size, head_hidden_size=0, **timm_set),
    }
    results = {}
    for row in args.rows:
        results[row] = {}
        budgets = [f"{args.c0_steps} steps"] if row.startswith("c0") else [str(e) for e in args.epochs]
        for budget in budgets:
            results[row][budget] = []
            for seed in args.seeds[:1] if row.startswith("c0") else args.seeds:
                if row.startswith("pipeline"):
                    r = pipeline_run(args.recipe, shards, args.work / f"{row}-e{budget}-s{seed}", seed, int(budget),
                                     threads=args.threads, overrides=peer_overrides if row == "pipeline-timm" else
                                     [f"model.name={args.model}"])
                elif row.startswith("c0"):
                    r = plain_run(builders[row], data, seed, 1, c0_recipe, max_steps=args.c0_steps,
                                  eval_every_epoch=False)
                else:
                    r = plain_run(builders[row], data, seed, int(budget), recipe)
                results[row][budget].append(r)
                ema = "-" if r["ema_top1"] is None else f"{r['ema_top1']:.4f}"
                print(f"  {row:<14} {budget:>9} seed={seed} top1={r['top1']:.4f} ema={ema} loss={r['loss']:.3f} "
                      f"cpu={r['cpu_s']:.0f}s curve={[round(c, 3) for c in r['curve']]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: dict[str, dict[str, list[dict]]], args: argparse.Namespace) -> None:
    print(f"\n{'row':<14} {'budget':>9} {'seeds':>5}  {'top-1':>13}  {'EMA top-1':>13}  {'final loss':>13}  cpu-s/run")
    for row, by_ep in results.items():
        for budget, runs in by_ep.items():
            ema = [r["ema_top1"] for r in runs if r.get("ema_top1") is not None]
            print(f"{row:<14} {budget:>9} {len(runs):>5}  {fmt([r['top1'] for r in runs]):>13}  "
                  f"{fmt(ema) if ema else '-':>13}  {fmt([r['loss'] for r in runs]):>13}  "
                  f"{statistics.median(r['cpu_s'] for r in runs):.0f}")
    if args.png:
        plot(results, args.png)
        print(f"curves: {args.png}")


def plot(results: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """Eval top-1 against the fraction of training, one panel per epoch budget: mean, min-max band over seeds."""
    import matplotlib  # lazy: only with --png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for by in results.values() for b in by if b.isdigit()}, key=int)
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for row, by in results.items():
            runs = [r["curve"] for r in by.get(budget, []) if r["curve"]]
            if not runs:
                continue
            n = min(len(c) for c in runs)
            curves = np.array([c[:n] for c in runs])
            x = np.arange(1, n + 1) * int(budget) / n
            ax.plot(x, curves.mean(0), marker="o", markersize=3, label=f"{row} ({len(runs)} seeds)")
            ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.2)
        ax.set(title=f"{budget} epochs, 64 px digits x 4 rotations", xlabel="epoch", ylabel="val top-1",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
