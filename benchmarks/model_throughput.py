"""Training-step throughput of this project's CoAtNet against timm's coatnet_N_224, side by side.

Each row is one model trained for ``--steps`` timed steps (after ``--warmup``) on the same random
batch: forward, cross-entropy, backward, AdamW step. On CUDA: bf16 autocast, fused AdamW, CUDA-event
timing; on CPU: fp32, perf_counter timing. Reported per row: median step time, images/s, achieved
TFLOP/s (6 x MACs x images/s, MACs from the analytic counter for this project and from torch's flop
counter for timm), utilisation against ``--peak`` TFLOP/s, and peak memory. The ratio line divides
this project's images/s by timm's.

    python benchmarks/model_throughput.py --models coatnet_0 --batch 8 --steps 5           # CPU
    python benchmarks/model_throughput.py --models coatnet_0 coatnet_2 --batch 256 --peak 790 \\
        --compile ours --json out.json --md out.md                                          # one H200

``--max-batch`` instead searches the largest micro-batch that trains (doubling, then bisection) with
activation checkpointing, e.g. for coatnet_7 on one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import coatnet  # noqa: E402


def timm_name(name: str) -> str | None:
    n = name.removeprefix("coatnet_")
    return f"coatnet_{n}_224" if n in {"0", "1", "2", "3", "4", "5"} else None


def build(impl: str, name: str, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, float]:
    """The model (parameters contiguous, on ``device``) and its MACs per image."""
    if impl == "ours":
        model = coatnet.create_model(
            name, num_classes=args.num_classes, img_size=args.img_size, drop_path_rate=args.drop_path,
            attn_impl=args.attn_impl, channels_last=not args.no_channels_last, device=device,
        )
        macs = float(coatnet.count(model.config)[1])
    else:
        import timm

        model = timm.create_model(timm_name(name), num_classes=args.num_classes, img_size=args.img_size,
                                  drop_path_rate=args.drop_path).to(device)
        macs = flop_counter_macs(model, args.img_size)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model, macs


def flop_counter_macs(model: torch.nn.Module, img_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype))
    model.train(was)
    return fc.get_total_flops() / 2


def make_step(model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "rel" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "rel" not in n)]
    fused = device.type == "cuda" and not args.no_fused_adamw
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, fused=fused or None)
    amp = device.type == "cuda" and args.dtype == "bf16"
    fwd = model
    if args.compile_this:
        fwd = torch.compile(model, mode=args.compile_mode)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, x, y, warmup: int, steps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step(x, y)
    sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(x, y)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step(x, y)
            times.append(time.perf_counter() - t0)
    return times


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (Linux: KiB)


def inputs(batch: int, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last), y


class Runner:
    """One model with its optimizer step, ready to be timed."""

    def __init__(self, impl: str, name: str, args: argparse.Namespace, device: torch.device) -> None:
        self.impl, self.device, self.args = impl, device, args
        self.row = {"impl": "this project" if impl == "ours" else "timm",
                    "model": name if impl == "ours" else timm_name(name), "batch": args.batch,
                    "img_size": args.img_size, "dtype": args.dtype if device.type == "cuda" else "fp32"}
        self.times: list[float] = []
        self.error: str | None = None
        self.peak = 0.0
        try:
            torch.manual_seed(0)
            self.model, self.macs = build(impl, name, args, device)
            self.model.train()
            args.compile_this = args.compile in ("both", impl)
            self.row["compiled"] = args.compile_this
            self.step = make_step(self.model, args, device)
            self.x, self.y = inputs(args.batch, args, device)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built is a result, not a crash
            self.fail(e)

    def fail(self, e: BaseException) -> None:
        self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  {self.row['model']}: FAILED {self.error}", flush=True)
        self.model = self.step = None
        gc.collect()

    def warmup(self) -> None:
        if self.error:
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for _ in range(self.args.warmup):
                self.step(self.x, self.y)
            sync(self.device)
        except Exception as e:  # noqa: BLE001 - e.g. timm under torch.compile
            self.fail(e)

    def timed_step(self) -> None:
        if self.error:
            return
        try:
            self.times += time_steps(self.step, self.x, self.y, 0, 1, self.device)
            print(f"    {self.row['model']} step {len(self.times)}/{self.args.steps}: {self.times[-1] * 1e3:.1f} ms "
                  f"({self.args.batch / self.times[-1]:.2f} images/s)", flush=True)
            self.peak = max(self.peak, peak_memory_gib(self.device))
        except Exception as e:  # noqa: BLE001
            self.fail(e)

    def result(self) -> dict:
        if self.error:
            return {**self.row, "error": self.error}
        med = statistics.median(self.times)
        ips = self.args.batch / med
        tflops = 6 * self.macs * ips / 1e12
        row = {**self.row, "step_ms_median": med * 1e3, "step_ms_min": min(self.times) * 1e3, "step_ms_all": [t * 1e3 for t in self.times],
               "images_per_s": ips, "gmacs_per_image": self.macs / 1e9, "achieved_tflops": tflops,
               "peak_mem_gib": self.peak}
        if self.args.peak:
            row["utilisation"] = tflops / self.args.peak
        print(f"  {row['model']}: {ips:.2f} images/s, {tflops:.4f} TFLOP/s, median step {med * 1e3:.1f} ms",
              flush=True)
        return row

    def close(self) -> None:
        self.model = self.step = self.x = self.y = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def run_pair(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """This project's model and timm's on the same input. Interleaved step by step (a shared CPU's load
    then hits both alike) or one after the other (clean per-model peak memory on a dedicated GPU)."""
    impls = ["ours"] + (["timm"] if not args.no_timm and timm_name(name) else [])
    rows = []
    if args.interleave:
        runners = [Runner(i, name, args, device) for i in impls]
        for r in runners:
            r.warmup()
        for _ in range(args.steps):
            for r in runners:
                r.timed_step()
        rows = [r.result() for r in runners]
        for r in runners:
            r.close()
    else:
        for i in impls:
            r = Runner(i, name, args, device)
            r.warmup()
            for _ in range(args.steps):
                r.timed_step()
            rows.append(r.result())
            r.close()
    return rows


def max_batch(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Largest micro-batch that trains: one model and optimizer (states allocated by a batch-1 step),
    then one step per candidate batch, doubling then bisecting to within ~1/8."""
    torch.manual_seed(0)
    model, macs = build("ours", name, args, device)
    model.train()
    args.compile_this = False
    step = make_step(model, args, device)
    x1, y1 = inputs(1, args, device)
    step(x1, y1)
    tried: dict[int, bool] = {}

    def trains(batch: int) -> bool:
        x = y = None
        try:
            x, y = inputs(batch, args, device)
            step(x, y)
            sync(device)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        del x, y
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tried[batch] = ok
        print(f"  batch {batch}: {'trains' if ok else 'out of memory'}", flush=True)
        if args.json:  # progressive, in case the time limit cuts the search short
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.with_suffix(".search.json").write_text(json.dumps({"model": name, "tried": tried}))
        return ok

    lo, hi = 0, args.batch
    while trains(hi):
        lo, hi = hi, hi * 2
        if hi > args.max_batch_limit:
            break
    while lo and hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if trains(mid) else (lo, mid)
    row = {"model": name, "largest_micro_batch": lo, "grad_checkpointing": args.grad_ckpt, "tried": tried}
    model = step = None  # release before timing the chosen batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if lo:
        args.batch, args.no_timm = lo, True
        row.update(run_pair(name, args, device)[0])
    return row


def markdown(rows: list[dict], ratios: list[dict], args: argparse.Namespace) -> str:
    lines = ["| impl | model | batch | dtype | images/s | median step ms | GMACs/img | TFLOP/s | util | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['model']} | {r['batch']} | {r['dtype']} | failed: {r['error']} |||||||")
            continue
        util = f"{100 * r['utilisation']:.1f}%" if "utilisation" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['model']} | {r['batch']} | {r['dtype']} | {r['images_per_s']:.1f} | "
            f"{r['step_ms_median']:.1f} | {r['gmacs_per_image']:.2f} | {r['achieved_tflops']:.3f} | {util} | "
            f"{r['peak_mem_gib']:.1f} |"
        )
    for q in ratios:
        lines.append(f"\n{q['model']}: this project / timm images/s = **{q['ratio']:.2f}x** (median steps; "
                     f"{q['ratio_best_step']:.2f}x best step vs best step)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["coatnet_0"])
    p.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 CUDA, 1 CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on CUDA (CPU: fp32)")
    p.add_argument("--peak", type=float, default=None, help="peak TFLOP/s for utilisation (H200 bf16 dense: 790)")
    p.add_argument("--compile", choices=["none", "ours", "timm", "both"], default="none")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--attn-impl", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--no-channels-last", action="store_true", help="this project's activations in NCHW")
    p.add_argument("--no-fused-adamw", action="store_true")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--no-timm", action="store_true", help="only this project's models")
    p.add_argument("--max-batch", action="store_true", help="search the largest trainable micro-batch instead")
    p.add_argument("--max-batch-limit", type=int, default=4096)
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate the two models' timed steps (default on CPU, where load is shared)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (256 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 5)
    args.interleave = (not cuda) if args.interleave is None else args.interleave
    if args.threads:
        torch.set_num_threads(args.threads)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if cuda else platform.processor()
           or platform.machine(), "threads": torch.get_num_threads(), "python": platform.python_version()}
    print(f"benchmark on {env['device']} (torch {env['torch']}, {env['threads']} threads)", flush=True)

    rows, ratios, searches = [], [], []
    for name in args.models:
        if args.max_batch:
            print(f"{name}: largest micro-batch search from {args.batch}", flush=True)
            searches.append(max_batch(name, args, device))
            continue
        print(f"{name} at {args.img_size}, batch {args.batch}:", flush=True)
        pair = run_pair(name, args, device)
        rows += pair
        if len(pair) == 2 and not any("error" in r for r in pair):
            ratios.append({"model": name, "ratio": pair[0]["images_per_s"] / pair[1]["images_per_s"],
                           # best step against best step: less sensitive to a shared machine's load spikes
                           "ratio_best_step": pair[1]["step_ms_min"] / pair[0]["step_ms_min"]})
            print(f"  ratio this project / timm: {ratios[-1]['ratio']:.2f}x (median steps), "
                  f"{ratios[-1]['ratio_best_step']:.2f}x (best steps)", flush=True)
    md = markdown(rows, ratios, args) if rows else ""
    if searches:
        md += "\n| model | largest micro-batch | images/s | peak GiB |\n|---|---|---|---|\n" + "".join(
            f"| {s['model']} | {s['largest_micro_batch']} | {s.get('images_per_s', float('nan')):.1f} | "
            f"{s.get('peak_mem_gib', float('nan')):.1f} |\n" for s in searches)
    print("\n" + md)
    result = {"env": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "ratios": ratios, "max_batch": searches}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
