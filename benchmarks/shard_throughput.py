"""Throughput of the Ray sharding pipeline against a single-process loop doing the same work.

Both sides run ``pipeline.data.shard_dataset`` on the same generated image folder (ImageNet-like
JPEGs): ``executor="local"`` is the single-process loop (same read, hash, decode, resize, re-encode
and MDS write code, one process), ``executor="ray"`` Ray tasks (one per part) with ``--workers`` workers
on an already started local Ray (its start-up, a one-off per job, is reported separately).
Repeats are interleaved and medians reported; speed-up = ray / local images/s, scaling efficiency
= speed-up / workers.

    .venv/bin/python benchmarks/shard_throughput.py --images 600 --repeats 3 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline.data import shard_dataset

H200_COATNET2_IMAGES_PER_S = (900, 1800)  # the training rate range for one H200


def make_corpus(root: Path, n: int, size: tuple[int, int], classes: int = 10) -> int:
    """``n`` photo-like JPEGs (smoothed noise, quality 92, like ImageNet's ~110 KB 500x375 files)."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(1.2))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        path = root / f"c{i % classes:02d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its descendants (the local Ray's raylet,
    GCS and workers included): a measure of work that other users of the machine do not distort."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_once(source: str, out: str, executor: str, workers: int, max_side: int) -> dict:
    cpu0, t = tree_cpu_seconds(), time.perf_counter()
    res = shard_dataset(source, out, executor=executor, workers=workers, max_side=max_side, progress=False)
    seconds, cpu = time.perf_counter() - t, tree_cpu_seconds() - cpu0
    run = res.manifest["run"]
    n = res.manifest["inputs"]["written"]
    return {"seconds": seconds, "images": n, "images_per_s": n / seconds, "cpu_s": cpu,
            "images_per_cpu_s": n / cpu, "cores_used": cpu / seconds,
            "list_s": run["list_s"], "write_s": run["write_s"], "write_images_per_s": n / run["write_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", default="500x375", help="source image size WxH")
    ap.add_argument("--max-side", type=int, default=320)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))

    import logging

    import ray

    with tempfile.TemporaryDirectory(prefix="coatnet-bench-") as tmp:
        corpus = Path(tmp, "corpus")
        nbytes = make_corpus(corpus, args.images, size)
        print(f"corpus: {args.images} JPEGs {args.size}, {nbytes / args.images / 1024:.0f} KiB avg; "
              f"max_side={args.max_side}; machine: {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at start", flush=True)
        t = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=256 << 20,
                 logging_level=logging.WARNING)
        ray_start = time.perf_counter() - t
        source = f"imagefolder:{corpus}"
        # One untimed warm-up each: the Ray workers' first imports (torch, via streaming) are a one-off per job.
        run_once(source, str(Path(tmp, "warm-ray")), "ray", args.workers, args.max_side)
        run_once(source, str(Path(tmp, "warm-local")), "local", 1, args.max_side)
        results: dict[str, list[dict]] = {"local": [], "ray": []}
        for r in range(args.repeats):
            for executor in ("local", "ray"):
                out = str(Path(tmp, f"{executor}-{r}"))
                res = run_once(source, out, executor, args.workers if executor == "ray" else 1, args.max_side)
                results[executor].append(res)
                print(f"  repeat {r} {executor:>5}: {res['images_per_s']:7.1f} images/s end to end, "
                      f"{res['write_images_per_s']:7.1f} images/s in the write phase, "
                      f"{res['images_per_cpu_s']:6.1f} images per CPU-s, {res['cores_used']:.2f} cores used "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        ray.shutdown()

    def med(executor: str, key: str) -> float:
        return statistics.median(r[key] for r in results[executor])

    local, fast = med("local", "images_per_s"), med("ray", "images_per_s")
    local_w, fast_w = med("local", "write_images_per_s"), med("ray", "write_images_per_s")
    speedup, speedup_w = fast / local, fast_w / local_w
    per_core = med("local", "images_per_cpu_s")
    cpu_eff = med("ray", "images_per_cpu_s") / per_core
    figures = {
        "images": args.images, "size": args.size, "max_side": args.max_side, "workers": args.workers,
        "repeats": args.repeats, "ray_start_s": round(ray_start, 2),
        "local_images_per_s": round(local, 1), "ray_images_per_s": round(fast, 1),
        "speedup": round(speedup, 3), "efficiency": round(speedup / args.workers, 3),
        "local_write_images_per_s": round(local_w, 1), "ray_write_images_per_s": round(fast_w, 1),
        "write_speedup": round(speedup_w, 3), "write_efficiency": round(speedup_w / args.workers, 3),
        "local_images_per_cpu_s": round(per_core, 1), "ray_images_per_cpu_s": round(med("ray", "images_per_cpu_s"), 1),
        "cpu_efficiency": round(cpu_eff, 3),
        "local_cores_used": round(med("local", "cores_used"), 2), "ray_cores_used": round(med("ray", "cores_used"), 2),
        "load_average_end": round(os.getloadavg()[0], 1),
        "cores_for_h200": [round(r / per_core, 1) for r in H200_COATNET2_IMAGES_PER_S],
    }
    print()
    print(f"{'':24}{'local (1 proc)':>16}{f'ray ({args.workers} workers)':>18}{'speed-up':>10}{'efficiency':>12}")
    print(f"{'end to end, images/s':24}{local:>16.1f}{fast:>18.1f}{speedup:>10.2f}{speedup / args.workers:>12.2f}")
    print(f"{'write phase, images/s':24}{local_w:>16.1f}{fast_w:>18.1f}{speedup_w:>10.2f}"
          f"{speedup_w / args.workers:>12.2f}")
    print(f"{'images per CPU-second':24}{per_core:>16.1f}{med('ray', 'images_per_cpu_s'):>18.1f}"
          f"{'':>10}{cpu_eff:>12.2f}   (CPU efficiency: useful share of the CPU Ray spends)")
    print(f"{'cores actually used':24}{med('local', 'cores_used'):>16.2f}{med('ray', 'cores_used'):>18.2f}")
    print(f"medians of {args.repeats} interleaved repeats; Ray start-up (once per job) {ray_start:.1f} s, not included; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    lo, hi = figures["cores_for_h200"]
    print(f"one core does {per_core:.0f} images per CPU-second: keeping one H200 fed (900-1800 images/s for "
          f"CoAtNet-2) needs about {lo:.0f}-{hi:.0f} such cores")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
