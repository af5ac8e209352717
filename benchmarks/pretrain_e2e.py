"""`coatnet pretrain` end to end: shard, train through the streaming loader to a checkpoint, resume, evaluate,
and the real loop's images/s beside the bare training step of the same model and batch, in one run.

The four stages run the command line as a user would (``python -m pipeline.cli``, i.e. ``coatnet``), each a
process of its own:

1. ``coatnet shard --local --source SOURCE`` writes MDS shards into the work directory;
2. ``coatnet pretrain --config RECIPE --resume none train.stop_after_steps=FIRST`` trains through the real
   streaming loader (``pipeline.train.data``) and checkpoints on the recipe's cadence;
3. ``coatnet pretrain --resume auto`` resumes from the newest checkpoint and trains to the plan's end; checked:
   the first run stopped at FIRST with a checkpoint of that step, the second says it resumed from it at FIRST
   and finished at the plan's last step;
4. ``coatnet evaluate`` on the run's exported weights (top-1 on the val split).

Then, in this process, the bare step (``model_throughput.make_step``: forward, cross-entropy, backward,
AdamW; bf16 autocast and fused AdamW on CUDA; one fixed batch already on the device) of the same model
(``pipeline.models.create_model`` with the recipe's arguments) and micro-batch. The loop's figures come from
the run's ``metrics.jsonl`` (``pipeline.train.metrics``: images/s and the share of wall time spent waiting for
the loader, per logging window), medians over the windows of both runs except each run's first (start-up).
Evaluation is outside the windows (``TrainMetrics.log_eval`` restarts the window); checkpoint writes are in.

    python benchmarks/pretrain_e2e.py --device cuda                          # one GPU: configs/pretrain/e2e_gpu.yaml
    python benchmarks/pretrain_e2e.py --device cpu --model coatnet_pico --img-size 32 --batch 32 \\
        --source digits21k:rotations=1,size=32 --steps 8 --first-steps 4 --checkpoint-every 2 --log-every 1

Tracking: MLflow is off (``logging.mlflow=false``, ``evaluate --no-mlflow``); the run's metrics file is read.
The last line is the ratio real loop / bare step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_throughput import inputs, make_step, peak_memory_gib, sync, time_steps  # noqa: E402

RECIPE = ROOT / "configs" / "pretrain" / "e2e_gpu.yaml"


class StageError(RuntimeError):
    pass


def run_stage(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, timeout: float) -> tuple[str, float]:
    """One command-line stage; its output goes to ``log_dir/name.log``. Returns (stdout+stderr, seconds)."""
    print(f"=== {name}: coatnet {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise StageError(f"{name}: did not finish in {timeout:.0f} s") from e
    seconds = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    (log_dir / f"{name}.log").write_text(text)
    if proc.returncode != 0:
        raise StageError(f"{name}: exit status {proc.returncode}; last output:\n{text[-3000:]}")
    print(f"    {seconds:.1f} s", flush=True)
    return text, seconds


def stage_env(device: str, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
           "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        # The trainer picks CUDA whenever it sees a GPU: hide it, and DeepSpeed's accelerator with it.
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the launcher makes its own group
    return env


def loop_windows(metrics: Path, first_steps: int, log_every: int) -> list[dict]:
    """The training rows of both runs, less each run's first window (start-up, first batches, warm-up)."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "images_per_s" in r]
    return [r for r in rows if r["step"] not in (log_every, first_steps + log_every)]


def bare_step(args: argparse.Namespace, cfg, num_classes: int, device: torch.device) -> dict:
    """The training step alone, of the model the recipe builds, on one fixed batch of ``args.batch``."""
    # lazy: after the runs, so that this process holds no GPU memory while they train
    from pipeline import models

    torch.manual_seed(0)
    m = cfg.model
    model = models.create_model(m.name, num_classes=num_classes, img_size=m.img_size,
                                drop_path_rate=m.drop_path_rate, overrides=m.overrides).to(device).train()
    ns = argparse.Namespace(img_size=m.img_size, num_classes=num_classes, dtype="bf16" if device.type == "cuda"
                            else "fp32", no_fused_adamw=False, compile_this=bool(args.compile), compile_mode=None)
    step = make_step(model, ns, device)
    x, y = inputs(args.batch, ns, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, x, y, args.bare_warmup, args.bare_steps, device)
    sync(device)
    med = statistics.median(times)
    return {"model": m.name, "img_size": m.img_size, "batch": args.batch, "dtype": ns.dtype,
            "compiled": ns.compile_this, "step_ms_median": med * 1e3, "images_per_s": args.batch / med,
            "peak_mem_gib": peak_memory_gib(device), "steps": len(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("--source", default="digits21k:rotations=4,size=64", help="what `coatnet shard` shards")
    p.add_argument("--model", default=None, help="model.name (default: the recipe's)")
    p.add_argument("--img-size", type=int, default=None, help="model.img_size (default: the recipe's)")
    p.add_argument("--batch", type=int, default=256, help="micro-batch per rank (global: x --nproc)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (gloo on CPU, one GPU each on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's epochs)")
    p.add_argument("--first-steps", type=int, default=50, help="the first run stops here; the second resumes")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint.interval_steps")
    p.add_argument("--log-every", type=int, default=None, help="logging.interval_steps (one window)")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (and evaluate --workers)")
    p.add_argument("--compile", action="store_true", help="model.compile=true, and the bare step compiled")
    p.add_argument("--bare-steps", type=int, default=20)
    p.add_argument("--bare-warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the stages")
    p.add_argument("--stage-timeout", type=float, default=150, help="seconds one stage may take")
    p.add_argument("--work", type=Path, default=None, help="shards and run directory (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more recipe overrides for both runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="coatnet-e2e-")
    work = (args.work or Path(tmp.name)).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = stage_env(args.device, args.threads)
    cli = [sys.executable, "-m", "pipeline.cli"]
    t_start = time.perf_counter()
    res: dict = {"device": args.device, "recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT)
                                                      else args.recipe), "source": args.source, "nproc": args.nproc}

    # 1. Shards.
    out, secs = run_stage("shard", [*cli, "shard", "--source", args.source, "--out", str(work / "shards"), "--local",
                                    "--no-progress"], env, logs, args.stage_timeout)
    root = Path(re.search(r"^dataset root: (.+)$", out, re.M).group(1).strip())
    shards = sorted(root.rglob("*.mds*"))
    if not shards:
        raise StageError(f"shard: no MDS shards under {root}")
    res["shard"] = {"seconds": secs, "root": str(root), "shards": len(shards),
                    "images": json.loads((root / "manifest.json").read_text())["inputs"]["written"]}

    # 2. Train to the first stop, 3. resume to the end.
    run_dir = work / "pretrain"
    overrides = [f"data.root={root}", f"output_dir={run_dir}", f"train.global_batch_size={args.batch * args.nproc}",
                 f"train.micro_batch_size={args.batch}", "logging.mlflow=false", "logging.progress_bar=false",
                 "data.clean_stale_shared_memory=false"]  # other jobs' streaming memory on a shared machine
    for key, value in (("model.name", args.model), ("model.img_size", args.img_size), ("train.max_steps", args.steps),
                       ("checkpoint.interval_steps", args.checkpoint_every),
                       ("logging.interval_steps", args.log_every), ("data.num_workers", args.workers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.compile:
        overrides.append("model.compile=true")
    overrides += args.overrides
    launch = ["--nproc", str(args.nproc), "--launcher", "local"]
    pretrain = [*cli, "pretrain", "--config", str(args.recipe), *launch]
    _, secs1 = run_stage("pretrain", [*pretrain, "--resume", "none", *overrides,
                                      f"train.stop_after_steps={args.first_steps}"], env, logs, args.stage_timeout)
    first = json.loads((run_dir / "result.json").read_text())
    if first["step"] != args.first_steps or first["finished"] or not first["last_checkpoint"]:
        raise StageError(f"pretrain: expected a stop at step {args.first_steps} with a checkpoint, got step "
                         f"{first['step']}/{first['total_steps']}, checkpoint {first['last_checkpoint']}")
    out2, secs2 = run_stage("resume", [*pretrain, "--resume", "auto", *overrides], env, logs, args.stage_timeout)
    second = json.loads((run_dir / "result.json").read_text())
    resumed = re.search(r"resumed from (\S+) at step (\d+)", out2)
    if not resumed or int(resumed.group(2)) != first["step"] or Path(resumed.group(1)) != Path(first["last_checkpoint"]):
        raise StageError(f"resume: did not resume from {first['last_checkpoint']} at step {first['step']} "
                         f"(see {logs / 'resume.log'})")
    if not second["finished"] or second["step"] != second["total_steps"]:
        raise StageError(f"resume: stopped at {second['step']}/{second['total_steps']}")
    checkpoints = sorted(int(m.group(1)) for c in (run_dir / "checkpoints").iterdir()
                         if (m := re.search(r"(\d+)$", c.name)) and c.is_dir())
    res["pretrain"] = {"seconds": secs1, "stopped_at": first["step"], "checkpoint": first["last_checkpoint"],
                       "total_steps": first["total_steps"]}
    res["resume"] = {"seconds": secs2, "resumed_at": int(resumed.group(2)), "finished_at": second["step"],
                     "checkpoints_kept": checkpoints, "final_metrics": second["final_metrics"]}

    # 4. Evaluate the exported weights.
    ev_cmd = [*cli, "evaluate", "--model", str(run_dir), "--data", str(root), "--split", "val", "--weights", "raw",
              "--device", args.device, "--batch-size", str(args.batch), "--no-mlflow", "--out", str(work / "eval"),
              "--json"]
    if args.workers is not None:
        ev_cmd += ["--workers", str(args.workers)]
    out3, secs3 = run_stage("evaluate", ev_cmd, env, logs, args.stage_timeout)
    report = json.loads(out3[out3.index("{"):out3.rindex("}") + 1])
    raw = report["weights"]["raw"]
    res["evaluate"] = {"seconds": secs3, "top1": raw["top1"], "samples": raw["num_samples"],
                       "images_per_s": raw.get("throughput_img_s")}

    # The loop's figures, then the bare step of the same model and batch.
    plan = json.loads((run_dir / "plan.json").read_text())
    log_every = plan_log_every(run_dir)
    windows = loop_windows(run_dir / "metrics.jsonl", args.first_steps, log_every)
    if not windows:
        raise StageError("metrics.jsonl: no training window past start-up; train longer or log more often")
    loop_ips = statistics.median(r["images_per_s"] for r in windows)
    wait = statistics.median(r["data_wait_frac"] for r in windows)
    res["loop"] = {"images_per_s": loop_ips, "data_wait_frac": wait, "windows": len(windows),
                   "window_steps": log_every, "world_size": plan["world_size"],
                   "images_per_s_all": [r["images_per_s"] for r in windows]}
    # lazy: the run's resolved recipe, as trained (config.yaml of the run directory)
    from pipeline.train.config import load_config

    cfg = load_config(run_dir / "config.yaml", [], check_data=False)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    bare = bare_step(args, cfg, plan["num_classes"], torch.device(args.device))
    res["bare"] = bare
    ratio = loop_ips / (bare["images_per_s"] * plan["world_size"])
    res["ratios"] = {"loop_vs_bare": ratio, "data_wait_share": wait}
    res["seconds"] = time.perf_counter() - t_start
    summary(res, cfg)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    if tmp:
        tmp.cleanup()
    return 0


def plan_log_every(run_dir: Path) -> int:
    # lazy: as in main
    from pipeline.train.config import load_config

    return load_config(run_dir / "config.yaml", [], check_data=False).logging.interval_steps


def summary(res: dict, cfg) -> None:
    s, pr, rs, ev, loop, bare = (res[k] for k in ("shard", "pretrain", "resume", "evaluate", "loop", "bare"))
    world = loop["world_size"]
    print(f"\n== coatnet pretrain end to end: {cfg.model.name} @ {cfg.model.img_size}px, micro-batch {bare['batch']} "
          f"x {world} rank(s), {res['device']}, {bare['dtype']}, compile {'on' if bare['compiled'] else 'off'}, "
          f"tracking off ==")
    print(f"shard      {s['images']} images in {s['shards']} shard files ({res['source']}), {s['seconds']:.1f} s")
    print(f"pretrain   steps 0 -> {pr['stopped_at']} of {pr['total_steps']}, checkpoint "
          f"{Path(pr['checkpoint']).name}, {pr['seconds']:.1f} s")
    print(f"resume     from step {rs['resumed_at']} -> {rs['finished_at']}, checkpoints kept "
          f"{rs['checkpoints_kept']}, {rs['seconds']:.1f} s")
    print(f"evaluate   val top-1 {ev['top1']:.4f} over {ev['samples']} images, {ev['seconds']:.1f} s")
    print(f"loop       {loop['images_per_s']:.1f} images/s (median of {loop['windows']} windows of "
          f"{loop['window_steps']} steps), waiting for data {loop['data_wait_frac']:.1%} of the time")
    print(f"bare step  {bare['images_per_s'] * world:.1f} images/s ({bare['images_per_s']:.1f} per rank x {world}; "
          f"median step {bare['step_ms_median']:.1f} ms, peak {bare['peak_mem_gib']:.1f} GiB)")
    print(f"total      {res['seconds']:.1f} s")
    print(f"ratio      real loop / bare step {res['ratios']['loop_vs_bare']:.2f}x, data-wait share "
          f"{res['ratios']['data_wait_share']:.2f}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StageError as e:
        print(f"pretrain_e2e: {e}", file=sys.stderr)
        sys.exit(1)
