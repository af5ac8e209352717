"""Images/s per core of the training input pipeline, before and after the uint8 change, against what the GPU consumes.

Runs the trainer's own loader (``pipeline.train.data.build_train_loader``: StreamingDataset over the
MDS shards, JPEG decode, RandomResizedCrop 224, flip, RandAugment as the recipe says, collate) on
ImageNet-like JPEGs that it makes itself (photo-like 500x375 images, sharded with
``shard_dataset(executor="local", max_side=320)`` as a real dataset would be), for each recipe
(default: coatnet_2_in1k = RandAugment 2/15 + MixUp 0.8, the heaviest; coatnet_2_in21k = crop + flip
only), DataLoader worker count and path, interleaved in the same run:

  before  the float path as it was (commit e47fd45, kept verbatim below): workers convert to float32,
          normalise (torchvision ToDtype/Normalize) and MixUp in the collate, seeding with torch.manual_seed;
  after   the trainer's loader now: workers send uint8 (N, H, W, 3) pixels; normalisation and MixUp run
          on the device after the copy (``device_input.to_device``, not part of these CPU figures: on a
          GPU it is GPU work; its cost if run on this CPU is printed apart).

Per pass: steady images/s and CPU-seconds per image of the process tree (main + live workers, from
/proc) in the window after the first round of batches (one per worker, which includes worker
start-up); images/s per core = 1 / CPU-seconds per image. The ratio table divides after by before, per
recipe and worker count. Also, in this process: decode + transform alone (``bare``) for the steps from
before to after, and the JPEG decoders compared on the sharded bytes (PIL as before, PIL as now,
torchvision.io.decode_jpeg) with their speed and pixel difference from PIL. Medians of ``--repeats``
interleaved repeats. CPU-seconds per image, unlike wall time, are little distorted by other users of a
shared machine.

Compared with what one GPU consumes (timm's CoAtNet training step on one H200, from the device notes:
coatnet_2 882 images/s, coatnet_0 1885; the project's goal is 1.5x those): cores needed to keep up
(rate x CPU-seconds per image, the after path), the images/s that ``--project-cores`` cores would
deliver at that cost, and what the best worker count measured here delivers.

``--gpu-decode`` (CUDA only; otherwise it says so and skips) also decodes the sharded JPEGs in
batches with ``torchvision.io.decode_jpeg(device="cuda")`` and compares speed and pixels with PIL.

    .venv/bin/python benchmarks/loader_throughput.py            # about 4 minutes on 2 quiet cores
    python3 benchmarks/loader_throughput.py --images 2048 --workers 1 4 8 16 --pass-seconds 4 --gpu-decode
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from pipeline.data import shard_dataset  # noqa: E402
from pipeline.train.config import (  # noqa: E402
    dataset_root,
    load_config,
    make_plan,
)
from pipeline.train.data import (  # noqa: E402
    ImageShards,
    build_train_loader,
    decode,
)
from pipeline.train.device_input import to_device  # noqa: E402
from pipeline.train.streaming_shm import dataset_prefix, release_deleted_dataset  # noqa: E402
from pipeline.train.transforms import augment_seed, batch_mix, to_uint8_hwc, train_augment, train_transform  # noqa: E402

# timm's CoAtNet training step on one H200 (bf16, batch 256; ../shared/device/README.md).
DEFAULT_GPU_RATES = ("coatnet_2=882", "coatnet_0=1885")
DEFAULT_TARGET = 1.5  # the project's goal: 1.5x timm's images/s
# The heaviest pretraining recipe (RandAugment 2/15 + MixUp 0.8, the 1K rows) and a 21K row (no RandAugment).
DEFAULT_RECIPES = ("coatnet_2_in1k", "coatnet_2_in21k")


def make_corpus(root: Path, n: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> int:
    """``n`` distinct photo-like JPEGs (smoothed noise over a colour gradient, quality 90) in class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    total = 0
    for i in range(n):
        noise = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(1.2))
        a, b, c = rng.uniform(-1, 1, 3)
        grad = ((a * xx / w + b * yy / h + c) * 60)[..., None] * rng.uniform(0.5, 1.0, 3)
        arr = np.clip(np.asarray(img, np.float32) * 0.7 + 40 + grad, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        path = root / f"c{i % classes:02d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def cpu_seconds() -> float:
    """User+system CPU of this process and of its terminated, joined children (the DataLoader workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def live_tree_cpu_seconds() -> float | None:
    """CPU of this process, its reaped children and its live children (the running workers, from /proc);
    None off Linux. Read at two batch arrivals it gives the CPU cost of the steady window, without the
    workers' start-up and shut-down (which rusage of joined children alone would include).
    """
    total = cpu_seconds()
    try:
        pids = set()
        for task in Path("/proc/self/task").iterdir():
            pids.update((task / "children").read_text().split())
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    except OSError:
        return None
    return total


def recipe_config(recipe: str, dataset: str, run_dir: Path, workers: int, batch: int, img_size: int):
    """The recipe's TrainConfig, pointed at the benchmark's shards, with this pass's worker count."""
    path = ROOT / "configs" / "pretrain" / f"{recipe}.yaml"
    overrides = [
        f"data.root={dataset}", f"output_dir={run_dir}", f"data.cache_dir={run_dir / 'cache'}",
        f"data.num_workers={workers}", "data.cache_limit=null", "data.num_canonical_nodes=1",
        f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}", f"model.img_size={img_size}",
        "logging.mlflow=false", "schedule.warmup_steps=0", "schedule.warmup_epochs=0",  # no schedule runs here
    ]
    # check_data=False: only the train split is read here (a tiny corpus may have no minival split).
    return load_config(path, overrides, check_data=False)


PATHS = ("before", "after")


def float_path_of_before(cfg, plan) -> dict:
    """``build_train_loader`` arguments that restore the float path as it was before the uint8 change: the
    sample and collate code below are verbatim copies of commit e47fd45's ImageShards.__getitem__ and
    MixCollate (only renamed), with its transform (``train_transform``: the PIL ops, then ToImage,
    ToDtype(float32, scale=True), Normalize)."""
    import torch
    from torch.utils.data import default_collate

    class FloatShardsBefore(ImageShards):
        def __getitem__(self, idx: int) -> dict:
            row = super(ImageShards, self).__getitem__(idx)
            img = Image.open(io.BytesIO(row["image"])).convert("RGB")
            if self.aug_seed is None:
                x = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(augment_seed(self.aug_seed, self.next_epoch - 1, idx))
                    x = self.transform(img)
            return {"image": x, "label": int(row["label"]), "idx": int(idx), "key": str(row.get("key", idx))}

    class MixCollateBefore:
        def __init__(self, mix, seed: int) -> None:
            self.mix = mix
            self.seed = seed

        def __call__(self, rows: list[dict]) -> dict:
            batch = default_collate(rows)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(augment_seed(self.seed, *batch["idx"].tolist()[:8]))
                batch["image"], batch["label"] = self.mix(batch["image"], batch["label"])
            return batch

    mix = batch_mix(cfg.augment, plan.num_classes)
    return {"dataset": FloatShardsBefore, "transform": train_transform(cfg.augment, cfg.model.img_size),
            "collate_fn": MixCollateBefore(mix, cfg.seed) if mix else None}


def run_pass(recipe: str, path: str, dataset: str, run_dir: Path, workers: int, batch: int, img_size: int,
             max_seconds: float) -> dict:
    """One epoch (or ``max_seconds``) through a freshly built training loader, on the ``path`` before or after."""
    import torch

    cfg = recipe_config(recipe, dataset, run_dir, workers, batch, img_size)
    plan = make_plan(cfg, 1, with_counts=False)
    parts = float_path_of_before(cfg, plan) if path == "before" else {}
    # Steady window: from the end of the first round (one batch per worker, start-up included) to the end.
    skip = max(1, workers)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, plan, **parts)
    arrivals: list[float] = []
    window_cpu: list[float | None] = []
    shape = None
    it = iter(loader)
    for b in it:
        arrivals.append(time.perf_counter())
        if len(arrivals) == skip:
            window_cpu.append(live_tree_cpu_seconds())
        shape, dtype = tuple(b["image"].shape), str(b["image"].dtype).removeprefix("torch.")
        if b["image"].is_floating_point() and not torch.isfinite(b["image"]).all():
            raise RuntimeError("non-finite pixels from the loader")
        if arrivals[-1] - t0 > max_seconds:
            break
    window_cpu.append(live_tree_cpu_seconds())
    prefix = dataset_prefix(loader.dataset)
    del it, loader  # shuts the workers down (joined: their CPU time lands in RUSAGE_CHILDREN)
    cpu = cpu_seconds() - cpu0
    gc.collect()
    release_deleted_dataset(prefix)  # streaming leaves a deleted dataset's blocks behind
    if not arrivals:
        raise RuntimeError(f"the loader gave no batch ({plan.train_samples} samples, batch {batch})")
    n = len(arrivals) * batch
    res = {"recipe": recipe, "path": path, "workers": workers, "batches": len(arrivals), "images": n,
           "batch_shape": shape, "batch_dtype": dtype,
           "first_batch_s": arrivals[0] - t0, "seconds": arrivals[-1] - t0,
           "images_per_s_total": n / (arrivals[-1] - t0), "cpu_ms_per_image_total": 1e3 * cpu / n}
    if len(arrivals) > skip:
        steady_n = (len(arrivals) - skip) * batch
        res["images_per_s"] = steady_n / (arrivals[-1] - arrivals[skip - 1])
        c0, c1 = window_cpu
        res["cpu_ms_per_image"] = 1e3 * (c1 - c0) / steady_n if c0 is not None and c1 is not None else None
    else:  # too few batches for a steady window: whole pass
        res["images_per_s"] = res["images_per_s_total"]
        res["cpu_ms_per_image"] = None
    if res["cpu_ms_per_image"] is None:
        res["cpu_ms_per_image"] = res["cpu_ms_per_image_total"]
    return res


def sample_bytes(dataset: str, local: Path, n: int) -> list[bytes]:
    """The first ``n`` encoded images of the train split, read through streaming (what the loader reads)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=f"{dataset_root(dataset)}/train", local=str(local), shuffle=False, batch_size=1)
    blobs = [ds[i]["image"] for i in range(min(n, ds.num_samples))]
    prefix = dataset_prefix(ds)
    del ds
    gc.collect()
    release_deleted_dataset(prefix)  # streaming leaves a deleted dataset's blocks behind
    return blobs


# The per-sample steps from before to after, each adding one change (decode + transform alone, this process).
BARE_STEPS = (
    ("before", "convert", "torch.manual_seed", "float"),
    ("uint8 out", "convert", "torch.manual_seed", "uint8"),
    ("+ CPU-only seed", "convert", "default_generator", "uint8"),
    ("after", "no convert", "default_generator", "uint8"),
)


def bare_transform(recipe: str, dataset: str, run_dir: Path, blobs: list[bytes], img_size: int) -> dict[str, float]:
    """CPU-ms per image of decode + seeding + the recipe's train transform alone, in this process (what a
    worker does per sample minus streaming, collation, MixUp and IPC), for each step of ``BARE_STEPS``."""
    import torch

    cfg = recipe_config(recipe, dataset, run_dir, 0, 1, img_size)
    float_tf, augment = train_transform(cfg.augment, img_size), train_augment(cfg.augment, img_size)
    out = {}
    for name, dec, seed, tail in BARE_STEPS:
        open_ = decode if dec == "no convert" else (lambda b: Image.open(io.BytesIO(b)).convert("RGB"))
        seed_ = torch.default_generator.manual_seed if seed == "default_generator" else torch.manual_seed
        tf = float_tf if tail == "float" else (lambda im: to_uint8_hwc(augment(im)))
        t = time.process_time()
        for i, b in enumerate(blobs):
            with torch.random.fork_rng(devices=[]):
                seed_(augment_seed(cfg.seed, 0, i))
                tf(open_(b))
        out[name] = 1e3 * (time.process_time() - t) / len(blobs)
    return out


def device_step_on_cpu(recipe: str, dataset: str, run_dir: Path, batch: int, img_size: int, reps: int = 5) -> float:
    """CPU-ms per image of ``device_input.to_device`` (normalise + the recipe's MixUp) run on this CPU: what
    the after path moved off the loader cores (on a GPU machine it is GPU work)."""
    import torch

    cfg = recipe_config(recipe, dataset, run_dir, 0, batch, img_size)
    b = {"image": torch.randint(0, 256, (batch, img_size, img_size, 3), dtype=torch.uint8),
         "label": torch.arange(batch) % 10, "idx": torch.arange(batch)}
    to_device(b, "cpu", torch.float32, cfg, mix_classes=10)
    t = time.process_time()
    for _ in range(reps):
        to_device(b, "cpu", torch.float32, cfg, mix_classes=10)
    return 1e3 * (time.process_time() - t) / (reps * batch)


def compare_decoders(blobs: list[bytes], repeats: int) -> dict:
    """JPEG decoders on the sharded bytes, one thread: CPU-ms per image and pixel difference from PIL."""
    import torch
    import torchvision.io as tio

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def tv(d: torch.Tensor) -> torch.Tensor:
        return tio.decode_jpeg(d, mode=tio.ImageReadMode.RGB)

    decoders = {
        "pil_convert (before)": lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"),
        "pil (after)": lambda i: decode(blobs[i]).load(),
        "torchvision_cpu": lambda i: tv(datas[i]),
        # What using it here would take: the augmentation works on PIL images.
        "torchvision_cpu_to_pil": lambda i: Image.fromarray(tv(datas[i]).permute(1, 2, 0).numpy()),
    }
    times: dict[str, list[float]] = {k: [] for k in decoders}
    for _ in range(repeats):
        for name, fn in decoders.items():
            t = time.process_time()
            for i in range(len(blobs)):
                fn(i)
            times[name].append(1e3 * (time.process_time() - t) / len(blobs))
    diffs = [np.abs(np.asarray(decode(b), np.int16) - tv(d).permute(1, 2, 0).numpy().astype(np.int16))
             for b, d in zip(blobs, datas)]
    return {"images": len(blobs), "cpu_ms_per_image": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "torchvision_vs_pil_max_abs": int(max(d.max() for d in diffs)),
            "torchvision_vs_pil_mean_abs": float(np.mean([d.mean() for d in diffs])),
            "torchvision_vs_pil_differing_fraction": float(np.mean([(d > 0).mean() for d in diffs]))}


def gpu_decode(dataset: str, local: Path, n: int, batch: int, repeats: int) -> dict:
    """Batched JPEG decode on the GPU (torchvision.io) vs PIL (the loader's decode) and torchvision on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "reason": "CUDA is not available on this machine"}
    import torchvision.io as tio

    blobs = sample_bytes(dataset, local, n)
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    batches = [datas[i:i + batch] for i in range(0, len(datas), batch)]

    def pil() -> None:
        for b in blobs:
            Image.open(io.BytesIO(b)).convert("RGB").load()

    def tv_cpu() -> None:
        for chunk in batches:
            tio.decode_jpeg(chunk, mode=tio.ImageReadMode.RGB)

    def tv_cuda() -> None:
        for chunk in batches:
            tio.decode_jpeg(chunk, mode=tio.ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()

    rates: dict[str, list[float]] = {"pil_cpu": [], "torchvision_cpu": [], "torchvision_cuda": []}
    tv_cuda()  # warm-up: nvJPEG handle and CUDA context
    diffs = []
    for chunk, start in zip(batches, range(0, len(blobs), batch)):
        for j, img in enumerate(tio.decode_jpeg(chunk, mode=tio.ImageReadMode.RGB, device="cuda")):
            ref = np.asarray(Image.open(io.BytesIO(blobs[start + j])).convert("RGB"), np.int16)
            diffs.append(np.abs(img.permute(1, 2, 0).cpu().numpy().astype(np.int16) - ref))
    for _ in range(repeats):
        for name, fn in (("pil_cpu", pil), ("torchvision_cpu", tv_cpu), ("torchvision_cuda", tv_cuda)):
            t = time.perf_counter()
            fn()
            rates[name].append(len(blobs) / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"available": True, "images": len(blobs), "batch": batch, "device": torch.cuda.get_device_name(),
            "images_per_s": {k: round(v, 1) for k, v in med.items()},
            "cuda_vs_pil": round(med["torchvision_cuda"] / med["pil_cpu"], 2),
            "cuda_vs_torchvision_cpu": round(med["torchvision_cuda"] / med["torchvision_cpu"], 2),
            "cuda_vs_pil_max_abs": int(max(d.max() for d in diffs)),
            "cuda_vs_pil_mean_abs": float(np.mean([d.mean() for d in diffs])),
            "note": "decode only (CUDA: encoded bytes in, decoded images on the GPU, upload included); "
                    "CPU rows on one thread. Using it means running the augmentation on the GPU too (not measured)"}


def parse_rates(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--gpu-rates: {item!r} is not NAME=IMAGES_PER_S")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=320, help="JPEGs generated (train split ~97%% of them)")
    ap.add_argument("--size", default="500x375", help="generated image size WxH (ImageNet's typical)")
    ap.add_argument("--max-side", type=int, default=320, help="shard_dataset's resize of the longer side")
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="configs/pretrain/<name>.yaml")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                    help="before: the float path as it was; after: the trainer's uint8 loader")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pass-seconds", type=float, default=30.0, help="cut a pass short after this long")
    ap.add_argument("--gpu-rates", nargs="+", default=list(DEFAULT_GPU_RATES),
                    help="images/s one GPU consumes, NAME=RATE (default: timm on one H200)")
    ap.add_argument("--target", type=float, default=DEFAULT_TARGET, help="the project's speed-up goal over those")
    ap.add_argument("--project-cores", type=int, default=16,
                    help="project the images/s of this many cores (the H200 machine has 16)")
    ap.add_argument("--gpu-decode", action="store_true", help="also compare JPEG decode on CUDA with PIL")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    gpu_rates = parse_rates(args.gpu_rates)

    import torch

    # workers=0 is then a one-core synchronous baseline, like each worker (DataLoader gives workers one
    # thread); on a shared machine more intra-op threads only spin against other users.
    torch.set_num_threads(1)
    results: list[dict] = []
    bare: dict[str, list[dict[str, float]]] = {r: [] for r in args.recipes}
    with tempfile.TemporaryDirectory(prefix="coatnet-loader-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        nbytes = make_corpus(tmp / "corpus", args.images, size)
        shard = shard_dataset(f"imagefolder:{tmp / 'corpus'}", str(tmp / "shards"), executor="local",
                              max_side=args.max_side, progress=False)
        dataset = shard.uri
        train = shard.manifest["splits"]["train"]
        print(f"corpus: {args.images} JPEGs {args.size} ({nbytes / args.images / 1024:.0f} KiB avg), sharded at "
              f"max_side={args.max_side}: {train['samples']} train samples, "
              f"{train['bytes'] / max(train['samples'], 1) / 1024:.0f} KiB avg ({time.perf_counter() - t:.1f} s); "
              f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        if train["samples"] < args.batch:
            raise SystemExit(f"--images {args.images}: {train['samples']} train samples < --batch {args.batch}")
        blobs = sample_bytes(dataset, tmp / "bytes-cache", 128)
        decoders = compare_decoders(blobs, args.repeats)
        device_ms = {r: device_step_on_cpu(r, dataset, tmp / "dev", args.batch, args.img_size) for r in args.recipes}
        for recipe in args.recipes:  # untimed: first-use imports and caches are a one-off per process
            for path in args.paths:
                run_pass(recipe, path, dataset, tmp / f"warm-{recipe}-{path}", 0, args.batch, args.img_size, 0.0)
        for r in range(args.repeats):
            for recipe in args.recipes:
                bare[recipe].append(bare_transform(recipe, dataset, tmp / "bare", blobs, args.img_size))
                for w in args.workers:
                    for path in args.paths:  # interleaved: a change in the machine's load hits both alike
                        res = run_pass(recipe, path, dataset, tmp / f"run-{recipe}-{path}-w{w}-r{r}", w, args.batch,
                                       args.img_size, args.pass_seconds)
                        res["repeat"] = r
                        results.append(res)
                        print(f"  repeat {r} {recipe:>16} {path:>6} workers={w:<2}: {res['images_per_s']:7.1f} images/s "
                              f"steady, {res['images_per_s_total']:7.1f} incl. start-up (first batch "
                              f"{res['first_batch_s']:.2f} s), {res['cpu_ms_per_image']:5.2f} CPU-ms/image steady "
                              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        decode = {"available": False, "reason": "not requested (--gpu-decode)"}
        if args.gpu_decode:
            decode = gpu_decode(dataset, tmp / "decode-cache", min(train["samples"], 512), args.batch, args.repeats)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in rows)

    summary = []
    for recipe in args.recipes:
        bare_ms = {name: statistics.median(b[name] for b in bare[recipe]) for name, *_ in BARE_STEPS}
        for path in args.paths:
            for w in args.workers:
                rows = [x for x in results if x["recipe"] == recipe and x["path"] == path and x["workers"] == w]
                ips, cpu_ms = med(rows, "images_per_s"), med(rows, "cpu_ms_per_image")
                bare_path = bare_ms[path]
                summary.append({
                    "recipe": recipe, "path": path, "workers": w, "images_per_s": round(ips, 1),
                    "images_per_s_all": [round(x["images_per_s"], 1) for x in rows],
                    "images_per_s_per_worker": round(ips / w, 1) if w else None,
                    "images_per_s_per_core": round(1e3 / cpu_ms, 1),
                    "images_per_s_total": round(med(rows, "images_per_s_total"), 1),
                    "first_batch_s": round(med(rows, "first_batch_s"), 2),
                    "cpu_ms_per_image": round(cpu_ms, 2),
                    "cpu_ms_per_image_total": round(med(rows, "cpu_ms_per_image_total"), 2),
                    "bare_cpu_ms_per_image": round(bare_path, 2),
                    "loader_cost_over_bare": round(cpu_ms / bare_path, 2),
                    "projected_images_per_s": round(args.project_cores * 1e3 / cpu_ms, 1),
                    "batch_shape": list(rows[0]["batch_shape"]), "batch_dtype": rows[0]["batch_dtype"],
                })
    ratios = []
    if set(PATHS) <= set(args.paths):
        for recipe in args.recipes:
            for w in args.workers:
                b, a = ({s["path"]: s for s in summary if s["recipe"] == recipe and s["workers"] == w}[p] for p in PATHS)
                ratios.append({"recipe": recipe, "workers": w,
                               "per_core_before": b["images_per_s_per_core"], "per_core_after": a["images_per_s_per_core"],
                               "per_core_ratio": round(b["cpu_ms_per_image"] / a["cpu_ms_per_image"], 3),
                               "images_per_s_ratio": round(a["images_per_s"] / b["images_per_s"], 3)})
    bare_steps = {r: {name: round(statistics.median(b[name] for b in bare[r]), 3) for name, *_ in BARE_STEPS}
                  for r in args.recipes}
    keep_up = []
    after = "after" if "after" in args.paths else args.paths[0]
    for recipe in args.recipes:
        rows = [s for s in summary if s["recipe"] == recipe and s["path"] == after]
        # The cost per image of the way training runs it (workers > 0) when measured; the cheapest such setting.
        cpu_ms = min(s["cpu_ms_per_image"] for s in ([s for s in rows if s["workers"]] or rows))
        best = max(rows, key=lambda s: s["images_per_s"])
        for model, rate in gpu_rates.items():
            for label, consumed in (("timm", rate), (f"target {args.target:g}x", rate * args.target)):
                keep_up.append({
                    "recipe": recipe, "path": after, "model": model, "consumer": label,
                    "consumes_images_per_s": round(consumed, 1),
                    "cpu_ms_per_image": cpu_ms, "cores_needed": round(consumed * cpu_ms / 1e3, 1),
                    "projected_cores": args.project_cores,
                    "projected_over_consumed": round(args.project_cores * 1e3 / cpu_ms / consumed, 3),
                    "best_workers": best["workers"], "best_images_per_s": best["images_per_s"],
                    "delivered_over_consumed": round(best["images_per_s"] / consumed, 3),
                })
    figures = {
        "images": args.images, "size": args.size, "max_side": args.max_side, "batch": args.batch,
        "img_size": args.img_size, "repeats": args.repeats, "cpus": os.cpu_count(),
        "load_average_end": round(os.getloadavg()[0], 1), "gpu_rates": gpu_rates, "target": args.target,
        "project_cores": args.project_cores, "rows": summary, "ratios": ratios, "bare_steps": bare_steps,
        "device_step_on_cpu_ms_per_image": {r: round(v, 3) for r, v in device_ms.items()},
        "decoders": decoders, "keep_up": keep_up, "gpu_decode": decode,
    }

    print()
    print(f"{'recipe':>16} {'path':>6} {'workers':>7} {'images/s':>9} {'per core':>9} {'incl. start':>11} "
          f"{'1st batch s':>11} {'CPU-ms/img':>10} {'bare ms':>7} {'loader/bare':>11}  batch")
    for s in summary:
        print(f"{s['recipe']:>16} {s['path']:>6} {s['workers']:>7} {s['images_per_s']:>9.1f} "
              f"{s['images_per_s_per_core']:>9.1f} {s['images_per_s_total']:>11.1f} {s['first_batch_s']:>11.2f} "
              f"{s['cpu_ms_per_image']:>10.2f} {s['bare_cpu_ms_per_image']:>7.2f} {s['loader_cost_over_bare']:>11.2f}  "
              f"{s['batch_dtype']} {s['batch_shape']}")
    print(f"medians of {args.repeats} interleaved repeats; batch {args.batch}; images/s and CPU-ms in the steady window "
          f"(after one batch per worker); per core = 1000 / CPU-ms per image of the process tree; bare = decode + "
          f"transform alone in this process; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if ratios:
        print(f"\n{'recipe':>16} {'workers':>7} {'per core before':>15} {'after':>7} {'ratio':>7} {'images/s ratio':>14}")
        for q in ratios:
            print(f"{q['recipe']:>16} {q['workers']:>7} {q['per_core_before']:>15.1f} {q['per_core_after']:>7.1f} "
                  f"{q['per_core_ratio']:>6.2f}x {q['images_per_s_ratio']:>13.2f}x")
        print("after / before; per core from CPU-seconds per image (robust to a shared machine), images/s wall-clock")
    print("\nper-sample steps, decode + seed + transform alone, CPU-ms per image: " + "; ".join(
        f"{r}: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()) for r, steps in bare_steps.items()))
    print("to_device (normalise + MixUp) if run on this CPU instead of the GPU: " + ", ".join(
        f"{r} {v:.3f} CPU-ms/image" for r, v in figures["device_step_on_cpu_ms_per_image"].items()))
    d = decoders
    print(f"JPEG decode, {d['images']} sharded images, one thread, CPU-ms per image: " + ", ".join(
        f"{k} {v:.3f}" for k, v in d["cpu_ms_per_image"].items())
        + f"; torchvision vs PIL pixels: max |diff| {d['torchvision_vs_pil_max_abs']}, mean "
          f"{d['torchvision_vs_pil_mean_abs']:.4f}, {100 * d['torchvision_vs_pil_differing_fraction']:.2f}% differ")
    print()
    print(f"{'recipe':>16} {'GPU consumer':>22} {'images/s':>9} {'cores needed':>12} "
          f"{f'{args.project_cores} cores/consumed':>18} {'measured here/consumed':>23}")
    for k in keep_up:
        print(f"{k['recipe']:>16} {k['model'] + ' ' + k['consumer']:>22} {k['consumes_images_per_s']:>9.0f} "
              f"{k['cores_needed']:>12.1f} {k['projected_over_consumed']:>18.2f} "
              f"{k['delivered_over_consumed']:>17.3f} (w={k['best_workers']})")
    print(f"({after} path) cores needed = consumed images/s x loader CPU-seconds per image (cheapest worker count > 0); "
          f"{args.project_cores} cores = {args.project_cores} / CPU-seconds per image, assuming linear scaling "
          "and no core left to the trainer")
    if decode.get("available"):
        r = decode["images_per_s"]
        print(f"\nJPEG decode, {decode['images']} sharded images, batch {decode['batch']}: PIL {r['pil_cpu']:.0f}, "
              f"torchvision CPU {r['torchvision_cpu']:.0f}, torchvision CUDA {r['torchvision_cuda']:.0f} images/s "
              f"({decode['cuda_vs_pil']:.2f}x PIL); CUDA vs PIL pixels: max |diff| {decode['cuda_vs_pil_max_abs']}, "
              f"mean {decode['cuda_vs_pil_mean_abs']:.4f}")
    elif args.gpu_decode:
        print(f"\n--gpu-decode: unavailable, skipped ({decode['reason']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
