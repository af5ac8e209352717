"""Memory per rank under DeepSpeed ZeRO-2 and ZeRO-3, with and without the sharded EMA, on 1 and 2 ranks.

Each configuration runs in fresh processes (torchrun, gloo on CPU) through the trainer's own components
(engine.build_model: partitioned under ZeRO-3; engine.initialize; ema.ShardedEma) on random batches:

- peak RSS per rank after imports (base), after building the model, after ``deepspeed.initialize`` and
  after the training steps (DeepSpeed creates Adam's moments in the first step);
- model-state bytes per parameter per rank: RSS after a step, activations freed, minus the base, over
  the parameter count (weights, gradients, fp32 masters, Adam moments, the EMA);
- activation bytes per image: how much more RSS the forward pass keeps (for the backward) at micro-batch 2M
  than at M, per image;
- step time and the EMA update's time (medians of the timed steps), and their ratio.

From the 1- and 2-rank figures it fits bytes/param/rank = replicated + partitioned / N per stage: the
memory model ``coatnet cluster sizing`` uses (pipeline/cluster/sizing.py holds the figures of the last
run and the runbook says which are measured). CPU runs fp32; GPU training is bf16 mixed precision, whose
byte counts per dtype the sizing model states.

    python benchmarks/zero_memory.py                           # coatnet_2 at 64x64, micro-batch 4, ~6 min
    python benchmarks/zero_memory.py --model coatnet_3 --json out.json
    python benchmarks/zero_memory.py --stages 3 --no-ema       # one stage, a quicker re-run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from pipeline.train.config import load_config, make_plan  # noqa: E402
from pipeline.train.distributed import (  # noqa: E402
    free_port,
    setup_distributed,
)
from pipeline.train.ema import ShardedEma  # noqa: E402
from pipeline.train.engine import build_model, initialize  # noqa: E402

MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _live() -> int:
    """RSS once freed memory is handed back to the OS (glibc keeps freed heap memory otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return _rss()


# ---------------------------------------------------------------------------------------------
# One rank of one configuration.

def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    ctx = setup_distributed()
    cfg = load_config(ROOT / "configs" / "pretrain" / "demo.yaml", [
        f"model.name={a.model}", f"model.img_size={a.img_size}", "model.drop_path_rate=0.0",
        f"deepspeed.zero_stage={a.stage}", "deepspeed.precision=fp32", f"train.micro_batch_size={a.micro}",
        f"train.global_batch_size={a.micro * ctx.world_size}", f"output_dir={a.tmp}",
    ], check_data=False)
    plan = make_plan(cfg, ctx.world_size, train_samples=1 << 20, num_classes=a.classes)
    dist.barrier()
    row = {"stage": a.stage, "world": ctx.world_size, "ema": a.ema, "rank": ctx.rank, "params": plan.params,
           "base": _live()}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, plan)
    row["build"], row["build_live"] = _peak(), _live()
    engine, _ = initialize(model, cfg, plan)
    row["initialize"], row["initialize_live"] = _peak(), _live()
    ema = ShardedEma(engine, 0.9999) if a.ema else None
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(2 * a.micro, 3, a.img_size, a.img_size, generator=g)
    y = torch.randint(0, a.classes, (2 * a.micro,), generator=g)

    def step(n: int) -> tuple[float, int]:
        before = _live()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(engine(x[:n]), y[:n])
        saved = _rss() - before  # what autograd keeps for the backward (and, ZeRO-3, the gathered parameters)
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0, saved

    steps, emas, saved = [], [], []
    for i in range(a.warmup + a.steps):
        seconds, kept = step(a.micro)
        t0 = time.perf_counter()
        if ema is not None:
            ema.update()
        if i >= a.warmup:
            steps.append(seconds)
            emas.append(time.perf_counter() - t0)
            saved.append(kept)
        if i == 0:
            row["states"] = _live() - row["base"]  # after the first step: Adam's moments exist, activations freed
    # Activations per image: how much more the forward keeps at micro-batch 2M than at M, over M (what does
    # not scale with the batch, ZeRO-3's gathered parameters, cancels out).
    _, kept2 = step(2 * a.micro)
    row.update(step=_peak(), step_s=statistics.median(steps), ema_s=statistics.median(emas),
               act_per_image=(kept2 - statistics.median(saved)) / a.micro, ema_numel=ema.numel if ema else 0)
    rows = [None] * ctx.world_size
    dist.all_gather_object(rows, row)
    if ctx.rank == 0:
        Path(a.out).write_text(json.dumps(rows))
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# The driver: every configuration in its own processes, then the table and the fitted model.

def run_config(a: argparse.Namespace, stage: int, world: int, ema: bool, tmp: Path) -> list[dict]:
    out = tmp / f"z{stage}-w{world}-e{int(ema)}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(a.threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           # Tensors of 128 KiB and more in their own mappings, unmapped when freed: RSS then follows live
           # tensors instead of what glibc's heap keeps after a step (its threshold otherwise grows to 32 MiB).
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, "--worker", "--stage", str(stage), "--out", str(out),
           "--model", a.model, "--img-size", str(a.img_size), "--micro", str(a.micro), "--classes", str(a.classes),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads), "--tmp", str(tmp)]
    cmd += ["--ema"] if ema else []
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ZeRO-{stage} on {world} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  ZeRO-{stage}, {world} rank(s), EMA {'on' if ema else 'off'}: {time.time() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def summarise(rows: list[dict]) -> dict:
    """Per configuration the worst rank (memory) and the slowest (time); the fitted per-stage model."""
    configs: dict = {}
    for r in rows:
        configs.setdefault((r["stage"], r["world"], r["ema"]), []).append(r)
    table = []
    for (stage, world, ema), rs in sorted(configs.items()):
        p = rs[0]["params"]
        def worst(k: str, rs: list[dict] = rs) -> int:
            return max(r[k] - r["base"] for r in rs)

        table.append({
            "stage": stage, "world": world, "ema": ema, "params": p,
            "base_mib": max(r["base"] for r in rs) / MiB, "build_mib": worst("build") / MiB,
            "build_live_mib": worst("build_live") / MiB, "initialize_mib": worst("initialize") / MiB,
            "initialize_live_mib": worst("initialize_live") / MiB, "step_mib": worst("step") / MiB,
            "state_bytes_per_param": max(r["states"] for r in rs) / p,
            "act_mib_per_image": max(r["act_per_image"] for r in rs) / MiB,
            "step_ms": max(r["step_s"] for r in rs) * 1e3, "ema_ms": max(r["ema_s"] for r in rs) * 1e3,
            "ema_numel_per_rank": max(r["ema_numel"] for r in rs),
        })
    by = {(t["stage"], t["world"], t["ema"]): t for t in table}
    model = {}
    for stage in sorted({t["stage"] for t in table}):
        one, two = by.get((stage, 1, False)), by.get((stage, 2, False))
        if one and two:
            b1, b2 = one["state_bytes_per_param"], two["state_bytes_per_param"]
            # bytes/param/rank = replicated + partitioned / N, through the two points N=1 and N=2
            model[stage] = {"replicated": 2 * b2 - b1, "partitioned": 2 * (b1 - b2), "ratio_2_to_1": b2 / b1}
        for world in (1, 2):
            on, off = by.get((stage, world, True)), by.get((stage, world, False))
            if on and off:
                model.setdefault(stage, {})[f"ema_bytes_per_param_n{world}"] = \
                    on["state_bytes_per_param"] - off["state_bytes_per_param"]
    ema_ratio = [t["ema_ms"] / t["step_ms"] for t in table if t["ema"]]
    return {"table": table, "model": model, "ema_cost_ratio_median": statistics.median(ema_ratio) if ema_ratio else None}


def format_summary(s: dict, a: argparse.Namespace) -> str:
    lines = [f"{a.model} at {a.img_size}x{a.img_size}, micro-batch {a.micro}, fp32 on CPU ({a.threads} thread(s) "
             "per rank); MiB above the per-rank base RSS, worst rank; peak (live after it)",
             "| ZeRO | ranks | EMA | base RSS MiB | after build | after initialize | after step (peak) "
             "| states B/param/rank | act. MiB/image | step ms | EMA ms | EMA / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in s["table"]:
        ratio = f"{t['ema_ms'] / t['step_ms']:.2%}" if t["ema"] else "-"
        lines.append(
            f"| {t['stage']} | {t['world']} | {'on' if t['ema'] else 'off'} | {t['base_mib']:.0f} | "
            f"{t['build_mib']:.0f} ({t['build_live_mib']:.0f}) | {t['initialize_mib']:.0f} "
            f"({t['initialize_live_mib']:.0f}) | {t['step_mib']:.0f} | "
            f"{t['state_bytes_per_param']:.1f} | {t['act_mib_per_image']:.1f} | {t['step_ms']:.0f} | "
            f"{t['ema_ms']:.1f} | {ratio} |")
    lines.append("")
    for stage, m in sorted(s["model"].items()):
        if "replicated" in m:
            lines.append(f"ZeRO-{stage}: bytes/param/rank = {m['replicated']:.1f} + {m['partitioned']:.1f} / N "
                         f"(2 ranks / 1 rank = {m['ratio_2_to_1']:.2f})"
                         + "".join(f"; EMA +{m[k]:.1f} at N={k[-1]}" for k in sorted(m) if k.startswith("ema_")))
    if s["ema_cost_ratio_median"] is not None:
        lines.append(f"EMA update / step time (median over configurations): {s['ema_cost_ratio_median']:.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="coatnet_2")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--micro", type=int, default=4, help="images per rank per step")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-ema", action="store_true", help="skip the EMA-on configurations")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", default=None, help="also write the figures here")
    # Internal: one rank of one configuration.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--ema", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"zero_memory: {a.model} at {a.img_size}, micro-batch {a.micro}; ZeRO {a.stages}, ranks {a.worlds}",
              flush=True)
        for stage in a.stages:
            for world in a.worlds:
                for ema in ((False,) if a.no_ema else (False, True)):
                    rows += run_config(a, stage, world, ema, Path(tmp))
    summary = summarise(rows)
    summary["args"] = {k: v for k, v in vars(a).items() if k not in ("worker", "stage", "ema", "out", "tmp")}
    print(format_summary(summary, a))
    if a.json:
        Path(a.json).write_text(json.dumps({**summary, "rows": rows}, indent=2))
    return summary


if __name__ == "__main__":
    main()
