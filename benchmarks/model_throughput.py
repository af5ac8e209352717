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

``--trainer`` adds, beside the bare step, the step the pipeline's trainer runs, built through its own
engine construction (``pipeline.train.engine``: DeepSpeed with the recipe's ZeRO stage, bf16 on CUDA, its
AdamW: ``optim.impl``, torch's fused AdamW on CUDA by default) from ``--trainer-recipe`` (default: the model's 1K pretraining
recipe), fed what the loader delivers (pinned uint8 NHWC pixels): ``device_input.to_device`` (copy,
normalise, the recipe's MixUp), forward, the recipe's loss, the trainer's finiteness all-reduce, DeepSpeed's
backward and step, ``loss.item()``. Its ratio to the bare step is the trainer's overhead. Without deepspeed
(the GPU machine has it only from carried wheels) the row is skipped with a message.

``--max-batch`` instead searches the largest micro-batch that trains (doubling, then bisection) with
activation checkpointing, e.g. for coatnet_7 on one GPU.

    python benchmarks/model_throughput.py --models coatnet_pico --img-size 32 --batch 2 --steps 2 --trainer  # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import coatnet  # noqa: E402
from pipeline.train.config import load_config, make_plan  # noqa: E402
from pipeline.train.device_input import to_device  # noqa: E402
from pipeline.train.engine import build_model, initialize, input_dtype, optimizer_choice  # noqa: E402
from pipeline.train.loss import build_loss  # noqa: E402


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


IMPLS = {"ours": "this project", "timm": "timm", "trainer": "pipeline trainer"}


class Runner:
    """One model with its optimizer step, ready to be timed."""

    def __init__(self, impl: str, name: str, args: argparse.Namespace, device: torch.device) -> None:
        self.impl, self.device, self.args = impl, device, args
        self.row = {"impl": IMPLS[impl],
                    "model": name if impl == "ours" else timm_name(name), "batch": args.batch,
                    "img_size": args.img_size, "dtype": args.dtype if device.type == "cuda" else "fp32"}
        self.times: list[float] = []
        self.error: str | None = None
        self.skipped: str | None = None
        self.peak = 0.0
        if impl == "trainer":
            return  # TrainerRunner builds it
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
        if self.error or self.skipped:
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
        if self.error or self.skipped:
            return
        try:
            self.times += time_steps(self.step, self.x, self.y, 0, 1, self.device)
            print(f"    {self.row['model']} step {len(self.times)}/{self.args.steps}: {self.times[-1] * 1e3:.1f} ms "
                  f"({self.args.batch / self.times[-1]:.2f} images/s)", flush=True)
            self.peak = max(self.peak, peak_memory_gib(self.device))
        except Exception as e:  # noqa: BLE001
            self.fail(e)

    def result(self) -> dict:
        if self.skipped:
            return {**self.row, "skipped": self.skipped}
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
        row.update(self.extra())
        print(f"  {row['model']}: {ips:.2f} images/s, {tflops:.4f} TFLOP/s, median step {med * 1e3:.1f} ms",
              flush=True)
        return row

    def extra(self) -> dict:
        return {}

    def close(self) -> None:
        self.model = self.step = self.x = self.y = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_world_of_one(device: torch.device) -> None:
    """A process group of one, as the trainer's setup does for a plain ``python`` process (without importing
    pipeline.train.distributed, whose data module needs mosaicml-streaming)."""
    import deepspeed
    import torch.distributed as dist

    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        # set_device wants an index: a bare torch.device("cuda") raises "Expected a torch.device with a
        # specified index", which broke every trainer row on the H200.
        torch.cuda.set_device(device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0)))


def trainer_recipe(name: str, args: argparse.Namespace) -> Path:
    if args.trainer_recipe:
        return Path(args.trainer_recipe)
    row = ROOT / "configs" / "pretrain" / f"{name}_in1k.yaml"
    return row if row.is_file() else ROOT / "configs" / "pretrain" / "demo.yaml"


class TrainerRunner(Runner):
    """The pipeline trainer's step: its DeepSpeed engine (pipeline.train.engine) from the recipe, its input
    path (device_input.to_device on pinned uint8 pixels), its loss, and the per-micro-batch syncs of its loop."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        super().__init__("trainer", name, args, device)
        self.row["model"], self.row["compiled"] = name, False
        self.input_times: list[float] = []
        self.info: dict = {}
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            self.skipped = (f"deepspeed is not installed ({e}); on the GPU machine carry the wheels of "
                            "../shared/device/fetch-wheels.sh in .whl (run_h200.sh installs them)")
            print(f"  {name} trainer: SKIPPED {self.skipped}", flush=True)
            return
        if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
            self.skipped = "the trainer picks its device itself (CUDA when available); run without --device"
            print(f"  {name} trainer: SKIPPED {self.skipped}", flush=True)
            return
        try:
            self.build(name, args, device)
        except Exception as e:  # noqa: BLE001 - reported as the row's result
            self.fail(e)

    def build(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        import torch.distributed as dist

        join_world_of_one(device)
        recipe = trainer_recipe(name, args)
        self.tmp = tempfile.TemporaryDirectory(prefix="coatnet-trainer-step-")
        overrides = [
            f"model.name={name}", f"model.img_size={args.img_size}", f"model.num_classes={args.num_classes}",
            f"model.drop_path_rate={args.drop_path}", f"model.grad_checkpointing={str(args.grad_ckpt).lower()}",
            f"model.overrides={{attn_impl: {args.attn_impl}, channels_last: {str(not args.no_channels_last).lower()}}}",
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            f"deepspeed.zero_stage={args.zero_stage}",
            # The trainer's regional compile (model.compile) follows --compile ours|both, not the recipe's auto.
            f"model.compile={str(args.compile in ('ours', 'both')).lower()}",
            f"deepspeed.precision={'bf16' if device.type == 'cuda' and args.dtype == 'bf16' else 'fp32'}",
            "data.root=unused", f"output_dir={self.tmp.name}", "logging.mlflow=false",
            "schedule.warmup_steps=0", "schedule.warmup_epochs=0",
        ]
        cfg = load_config(recipe, overrides, check_data=False)
        plan = make_plan(cfg, 1, with_counts=False, train_samples=args.batch * 1000, num_classes=args.num_classes)
        torch.manual_seed(0)
        # The trainer's own choice (optim.impl, engine.optimizer_choice): no fallback here either, so the row
        # measures exactly what `coatnet pretrain` would run, and a build failure is the row's error.
        impl, why = optimizer_choice(cfg)
        engine, _ = initialize(build_model(cfg, plan), cfg, plan)
        optimizer = f"optim.impl={impl}: {why}"
        base = getattr(engine, "basic_optimizer", None) or engine.optimizer
        self.info = {"recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
                     "zero_stage": args.zero_stage, "precision": "bf16" if input_dtype(cfg) == torch.bfloat16
                     else "fp32", "optimizer": f"{type(base).__name__} in {type(engine.optimizer).__name__}",
                     "optimizer_note": optimizer, "mix": bool(cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha)}
        self.row["dtype"] = self.info["precision"]
        self.engine, self.cfg, self.plan = engine, cfg, plan
        self.model = engine.module
        self.macs = float(coatnet.count(engine.module.config)[1])
        loss_fn, dtype = build_loss(cfg.loss), input_dtype(cfg)
        g = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (args.batch, args.img_size, args.img_size, 3), dtype=torch.uint8, generator=g)
        batch = {"image": pixels.pin_memory() if device.type == "cuda" else pixels,
                 "label": torch.randint(0, args.num_classes, (args.batch,), generator=g),
                 "idx": torch.arange(args.batch)}

        def step(b: dict, _: None) -> torch.Tensor:
            x, y = to_device(b, device, dtype, cfg, mix_classes=plan.num_classes)
            loss = loss_fn(engine(x), y)
            # The loop's check that the loss is finite on every rank (DistContext.all_finite): a sync per micro-batch.
            flag = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                raise FloatingPointError("non-finite loss")
            engine.backward(loss)
            engine.step()
            loss.item()  # the loop accumulates the loss as a float
            return loss

        self.step, self.x, self.y = step, batch, None
        self.to_device = lambda: to_device(batch, device, dtype, cfg, mix_classes=plan.num_classes)

    def extra(self) -> dict:
        # The input part alone (copy, normalise, mix), timed after the steps.
        times = time_steps(lambda *_: self.to_device(), None, None, 1, 5, self.device)
        return {**self.info, "input_ms_median": statistics.median(times) * 1e3}

    def close(self) -> None:
        self.engine = self.to_device = None
        super().close()
        if getattr(self, "tmp", None):
            self.tmp.cleanup()


def run_pair(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """This project's model and timm's on the same input. Interleaved step by step (a shared CPU's load
    then hits both alike) or one after the other (clean per-model peak memory on a dedicated GPU)."""
    impls = ["ours"] + (["timm"] if not args.no_timm and timm_name(name) else []) + (["trainer"] if args.trainer else [])

    def runner(impl: str) -> Runner:
        return TrainerRunner(name, args, device) if impl == "trainer" else Runner(impl, name, args, device)

    rows = []
    if args.interleave:
        runners = [runner(i) for i in impls]
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
            r = runner(i)
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
        args.batch, args.no_timm, args.trainer = lo, True, False
        row.update(run_pair(name, args, device)[0])
    return row


def markdown(rows: list[dict], ratios: list[dict], args: argparse.Namespace) -> str:
    lines = ["| impl | model | batch | dtype | images/s | median step ms | GMACs/img | TFLOP/s | util | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['impl']} | {r['model']} | {r['batch']} | {r['dtype']} | {why} |||||||")
            continue
        util = f"{100 * r['utilisation']:.1f}%" if "utilisation" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['model']} | {r['batch']} | {r['dtype']} | {r['images_per_s']:.1f} | "
            f"{r['step_ms_median']:.1f} | {r['gmacs_per_image']:.2f} | {r['achieved_tflops']:.3f} | {util} | "
            f"{r['peak_mem_gib']:.1f} |"
        )
    for q in ratios:
        if "ratio" in q:
            lines.append(f"\n{q['model']}: this project / timm images/s = **{q['ratio']:.2f}x** (median steps; "
                         f"{q['ratio_best_step']:.2f}x best step vs best step)")
        if "trainer_vs_ours" in q:
            vs_timm = f", trainer / timm = **{q['trainer_vs_timm']:.2f}x**" if "trainer_vs_timm" in q else ""
            lines.append(f"\n{q['model']}: pipeline trainer step / bare step images/s = **{q['trainer_vs_ours']:.2f}x**"
                         f"{vs_timm} (median steps; trainer input copy + normalise {q['trainer_input_ms']:.2f} ms "
                         f"of its {q['trainer_step_ms']:.1f} ms step; optimizer {q['trainer_optimizer']})")
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
    p.add_argument("--trainer", action="store_true",
                   help="add the pipeline trainer's DeepSpeed step (pipeline.train.engine) beside the bare step")
    p.add_argument("--trainer-recipe", default=None,
                   help="recipe YAML of the trainer row (default: configs/pretrain/<model>_in1k.yaml, else demo.yaml)")
    p.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage of the trainer row")
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
        ok = {r["impl"]: r for r in pair if "images_per_s" in r}
        ours, timm, trainer = (ok.get(IMPLS[k]) for k in ("ours", "timm", "trainer"))
        q: dict = {"model": name}
        if ours and timm:
            q.update(ratio=ours["images_per_s"] / timm["images_per_s"],
                     # best step against best step: less sensitive to a shared machine's load spikes
                     ratio_best_step=timm["step_ms_min"] / ours["step_ms_min"])
            print(f"  ratio this project / timm: {q['ratio']:.2f}x (median steps), "
                  f"{q['ratio_best_step']:.2f}x (best steps)", flush=True)
        if ours and trainer:
            q.update(trainer_vs_ours=trainer["images_per_s"] / ours["images_per_s"],
                     trainer_input_ms=trainer["input_ms_median"], trainer_step_ms=trainer["step_ms_median"],
                     trainer_optimizer=trainer["optimizer"])
            if timm:
                q["trainer_vs_timm"] = trainer["images_per_s"] / timm["images_per_s"]
            print(f"  ratio pipeline trainer / this project's bare step: {q['trainer_vs_ours']:.2f}x", flush=True)
        if len(q) > 1:
            ratios.append(q)
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
