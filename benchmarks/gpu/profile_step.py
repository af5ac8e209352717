"""Where a CoAtNet training step spends its time, and what each model-side option changes.

Runs on CPU or CUDA. For one variant it (1) profiles a training step with torch.profiler and prints
the top operators by self time, and (2) times option pairs interleaved (A, B, A, B, ...; medians), so
that a shared machine's load hits both alike:
  - channels_last activations vs NCHW                   (training step)
  - SDPA with the float mask vs eager attention         (training step)
  - cached inference bias vs a gather per forward       (eval forward; counts index_select calls)

    python benchmarks/gpu/profile_step.py --model coatnet_0 --batch 4 --threads 1      # CPU
    python benchmarks/gpu/profile_step.py --model coatnet_0 --batch 128 --out out/      # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import coatnet  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make(args: argparse.Namespace, dev: torch.device, **overrides):
    torch.manual_seed(0)
    model = coatnet.create_model(args.model, img_size=args.img_size, device=dev, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if dev.type == "cuda" else None)
    amp = dev.type == "cuda"

    def train_step(x, y):
        model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_fwd(x, y):
        if model.training:  # once, as an evaluation loop does
            model.eval()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    return model, train_step, eval_fwd


def timed(fn, x, y, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn(x, y)
    sync(dev)
    return time.perf_counter() - t0


def ab(name: str, a, b, x, y, dev, reps: int) -> dict:
    a(x, y), b(x, y)  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(a, x, y, dev))
        tb.append(timed(b, x, y, dev))
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"{name}: {ma * 1e3:.1f} ms vs {mb * 1e3:.1f} ms -> {mb / ma:.2f}x", flush=True)
    return {"name": name, "a_ms": ma * 1e3, "b_ms": mb * 1e3, "speedup_a_over_b": mb / ma,
            "a_all_ms": [t * 1e3 for t in ta], "b_all_ms": [t * 1e3 for t in tb]}


def count_ops(fn, x, y, names: tuple[str, ...]) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x, y)
    counts = {n: 0 for n in names}
    for e in prof.key_averages():
        if e.key in counts:
            counts[e.key] = e.count
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coatnet_0")
    p.add_argument("--batch", type=int, default=None, help="default 128 CUDA, 4 CPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="folder for profile.txt and profile.json")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (128 if dev.type == "cuda" else 4)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    result: dict = {"model": args.model, "batch": batch, "device": str(dev), "torch": torch.__version__}

    _, step, fwd = make(args, dev)
    step(x, y)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(x, y)
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    print(table, flush=True)

    _, step_nchw, _ = make(args, dev, channels_last=False)
    _, step_eager, _ = make(args, dev, attn_impl="eager")
    model_nc, _, fwd_nocache = make(args, dev, cache_bias=False)
    result["ab"] = [
        ab("train step: channels_last vs NCHW", step, step_nchw, x, y, dev, args.reps),
        ab("train step: SDPA vs eager attention", step, step_eager, x, y, dev, args.reps),
        ab("eval forward: cached bias vs gather", fwd, fwd_nocache, x, y, dev, args.reps),
    ]
    ops = ("aten::index_select", "aten::copy_")
    result["eval_op_counts"] = {"cached": count_ops(fwd, x, y, ops), "no_cache": count_ops(fwd_nocache, x, y, ops)}
    print("eval forward op counts:", json.dumps(result["eval_op_counts"]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text(table)
        (args.out / "profile.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
