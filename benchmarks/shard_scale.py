"""Sharding at scale: the driver's memory against the number of images, and Ray's scaling from 1 to N workers.

Both parts shard the benchmark source ``synthetic:n=N,classes=C`` (workers generate tiny distinct
JPEGs, so neither the disk nor the network is the limit; every 1000th image repeats the one before it,
so the reduce step that finds duplicates across parts has work too) on a local Ray, into a temporary
folder.

1. **Driver memory.** One fresh process per size (``--sizes``): its resident set after imports and
   ``ray.init`` (the baseline), and its peak during ``shard_dataset``. The number of classes (units:
   what the driver plans with) is the same at every size, ``min(--classes, smallest size)``, so the
   slope measures what grows with images alone. Figure of merit: the slope of
   peak RSS against images, in MB per million images (least squares over the sizes; aim: < 200, the
   driver that held every image's record needed about 1,500). The Ray workers are other processes.
2. **Scaling.** One Ray of ``--workers`` CPUs; ``--scaling-images`` sharded with 1 worker and with
   ``--workers`` workers, interleaved ``--repeats`` times after a warm-up. Efficiency = (images/s with
   N) / (images/s with 1) / N, from the write phase (where the workers run) and end to end. The
   tasks' CPU-seconds per stage (read = generate here, hash, preprocess, MDS write, upload) and per
   image tell who is the limit: a task's share of a core while it computes (CPU/wall of the pure-CPU
   preprocessing stage) below 1 means the machine's cores are busy with other work; CPU-seconds per
   image rising with N means contended cores too; a share near 1 with the tasks' cores used short of
   N means the driver or Ray is the limit (gaps between tasks).

Quick check (about a minute):  python benchmarks/shard_scale.py --sizes 10000,50000 --scaling-images 20000 --repeats 1
Full figures (quiet machine):  python benchmarks/shard_scale.py --sizes 10000,100000,1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.data import shard_dataset

DUP_EVERY = 1000


def _source(n: int, classes: int) -> str:
    return f"synthetic:n={n},classes={classes},dup_every={DUP_EVERY}"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_memory(n: int, classes: int, workers: int) -> dict:
    """Run in a fresh process: the driver's baseline and peak RSS around one shard_dataset call."""
    import logging

    import ray

    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=256 << 20, logging_level=logging.WARNING)
    base = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="coatnet-scale-") as tmp:
        cpu0, t = time.process_time(), time.perf_counter()
        res = shard_dataset(_source(n, classes), tmp, workers=workers, progress=False)
        seconds, driver_cpu = time.perf_counter() - t, time.process_time() - cpu0
    ray.shutdown()
    m = res.manifest
    return {"images": n, "written": m["inputs"]["written"], "masked": m["inputs"]["masked"],
            "parts": sum(s["parts"] for s in m["splits"].values()), "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 1), "driver_cpu_s": round(driver_cpu, 2),
            "rss_base_mb": round(base, 1), "rss_peak_mb": round(_peak_rss_mb(), 1)}


def run_child(args: list[str], timeout: float) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants (the local Ray's raylet, GCS and workers)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def scaling(n: int, classes: int, workers: int, repeats: int) -> dict:
    import logging

    import ray

    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=256 << 20, logging_level=logging.WARNING)
    runs: dict[int, list[dict]] = {1: [], workers: []}
    with tempfile.TemporaryDirectory(prefix="coatnet-scale-") as tmp:
        # Warm-up: every worker process imports the pipeline (torch, via streaming) once per job.
        shard_dataset(_source(max(2000, 200 * workers), classes), str(Path(tmp, "warm")), workers=workers,
                      progress=False)
        for r in range(repeats):
            for w in (1, workers):
                cpu0, t = tree_cpu_seconds(), time.perf_counter()
                res = shard_dataset(_source(n, classes), str(Path(tmp, f"w{w}-{r}")), workers=w, progress=False,
                                    seed=r)
                seconds, all_cpu = time.perf_counter() - t, tree_cpu_seconds() - cpu0
                run = res.manifest["run"]
                rec = {"workers": w, "seconds": seconds, "write_s": run["write_s"],
                       "images_per_s": n / seconds, "write_images_per_s": n / run["write_s"],
                       "cpu": run["stages"]["cpu"], "wall": run["stages"]["wall"], "load": os.getloadavg()[0]}
                rec["task_cpu_s"] = sum(rec["cpu"].values())
                # Preprocessing is pure CPU: its CPU/wall is the share of a core a task got while it wanted one.
                rec["core_share"] = rec["cpu"]["preprocess"] / max(rec["wall"]["preprocess"], 1e-9)
                # How full the worker slots were: gaps between tasks (driver, Ray scheduling, the last wave).
                rec["occupancy"] = sum(rec["wall"].values()) / (w * run["write_s"])
                rec["other_cpu_s"] = max(0.0, all_cpu - rec["task_cpu_s"])  # driver, raylet, GCS, idle workers
                rec["cores_used"] = rec["task_cpu_s"] / run["write_s"]
                runs[w].append(rec)
                print(f"  repeat {r}, {w} worker(s): {rec['write_images_per_s']:8.0f} images/s writing, "
                      f"{rec['images_per_s']:8.0f} end to end, tasks used {rec['cores_used']:.2f} cores "
                      f"(load average {rec['load']:.1f})", file=sys.stderr, flush=True)
    ray.shutdown()
    return {str(w): v for w, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="images per driver-memory run")
    ap.add_argument("--classes", type=int, default=21841, help="classes (units) of the synthetic source")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scaling-images", type=int, default=100000)
    ap.add_argument("--scaling-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-scaling", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.classes, args.workers)))
        return 0
    if args.child_scaling:
        print(json.dumps(scaling(args.scaling_images, args.scaling_classes, args.workers, args.repeats)))
        return 0

    command = "python benchmarks/shard_scale.py " + " ".join(shlex.quote(a) for a in argv)
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    figures: dict = {"command": command}
    if not args.skip_memory:
        sizes = [int(s) for s in args.sizes.split(",")]
        classes = min(args.classes, min(sizes))
        print(f"driver memory: synthetic source, {classes} classes (units) at every size, {args.workers} workers")
        rows = []
        for n in sizes:
            row = run_child(["--child-memory", str(n), "--classes", str(classes), "--workers", str(args.workers)],
                            timeout=max(600, n / 50))
            rows.append(row)
            print(f"  {n:>9} images: {row['seconds']:7.1f} s, driver RSS {row['rss_base_mb']:.0f} MB after "
                  f"start-up, peak {row['rss_peak_mb']:.0f} MB, driver CPU {row['driver_cpu_s']:.1f} s", flush=True)
        per_million = slope([r["images"] for r in rows], [r["rss_peak_mb"] for r in rows]) * 1e6
        print()
        print(f"{'images':>10}{'parts':>7}{'seconds':>9}{'images/s':>10}{'RSS base MB':>13}{'RSS peak MB':>13}"
              f"{'growth MB':>11}{'driver CPU s':>14}")
        for r in rows:
            print(f"{r['images']:>10}{r['parts']:>7}{r['seconds']:>9.1f}{r['images_per_s']:>10.0f}"
                  f"{r['rss_base_mb']:>13.0f}{r['rss_peak_mb']:>13.0f}{r['rss_peak_mb'] - r['rss_base_mb']:>11.0f}"
                  f"{r['driver_cpu_s']:>14.1f}")
        print(f"driver memory: {per_million:.0f} MB per million images (slope of peak RSS over {len(rows)} sizes; "
              f"aim < 200; the per-image driver needed ~1,500)")
        figures["memory"] = {"rows": rows, "mb_per_million": round(per_million, 1)}
    if not args.skip_scaling:
        print(f"\nscaling: {args.scaling_images} images, {args.scaling_classes} classes, 1 vs {args.workers} workers, "
              f"{args.repeats} interleaved repeat(s)", flush=True)
        runs = run_child(["--child-scaling", "--scaling-images", str(args.scaling_images), "--scaling-classes",
                          str(args.scaling_classes), "--workers", str(args.workers), "--repeats", str(args.repeats)],
                         timeout=3600)
        one, many = runs["1"], runs[str(args.workers)]

        def med(rs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in rs)

        w_eff = med(many, "write_images_per_s") / med(one, "write_images_per_s") / args.workers
        e_eff = med(many, "images_per_s") / med(one, "images_per_s") / args.workers
        print(f"\n{'':28}{'1 worker':>12}{f'{args.workers} workers':>12}{'efficiency':>12}")
        print(f"{'write phase, images/s':28}{med(one, 'write_images_per_s'):>12.0f}"
              f"{med(many, 'write_images_per_s'):>12.0f}{w_eff:>12.2f}")
        print(f"{'end to end, images/s':28}{med(one, 'images_per_s'):>12.0f}{med(many, 'images_per_s'):>12.0f}"
              f"{e_eff:>12.2f}")
        print(f"{'cores used by the tasks':28}{med(one, 'cores_used'):>12.2f}{med(many, 'cores_used'):>12.2f}")
        print(f"{'share of a core per task':28}{med(one, 'core_share'):>12.2f}{med(many, 'core_share'):>12.2f}"
              "  (CPU/wall of preprocessing; < 1: the machine's cores are busy)")
        print(f"{'occupancy of worker slots':28}{med(one, 'occupancy'):>12.2f}{med(many, 'occupancy'):>12.2f}"
              "  (task time / (workers x write time); < 1: gaps between tasks)")
        print(f"{'task CPU us per image':28}{med(one, 'task_cpu_s') / args.scaling_images * 1e6:>12.0f}"
              f"{med(many, 'task_cpu_s') / args.scaling_images * 1e6:>12.0f}"
              f"{med(many, 'task_cpu_s') / med(one, 'task_cpu_s'):>12.2f}  (ratio > 1: contended cores)")
        free = (med(many, "occupancy") / med(one, "occupancy")) * (med(one, "task_cpu_s") / med(many, "task_cpu_s"))
        for stage in one[0]["cpu"]:
            c1 = statistics.median(r["cpu"][stage] for r in one)
            cn = statistics.median(r["cpu"][stage] for r in many)
            print(f"{'  CPU-s ' + stage:28}{c1:>12.2f}{cn:>12.2f}")
        print(f"{'  CPU-s driver + Ray':28}{med(one, 'other_cpu_s'):>12.2f}{med(many, 'other_cpu_s'):>12.2f}"
              "  (outside the tasks: planning, merging, Ray's own processes)")
        print(f"efficiency the pipeline allows with {args.workers} free cores: {free:.2f} (occupancy ratio x CPU per "
              "image ratio; measured efficiency is lower by the cores other work took)")
        print(f"medians of {args.repeats} interleaved repeat(s); load average now {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs (aim: efficiency >= 0.85 with {args.workers} free cores)")
        figures["scaling"] = {"write_efficiency": round(w_eff, 3), "end_to_end_efficiency": round(e_eff, 3),
                              "free_core_efficiency": round(free, 3), "runs": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
