"""Evaluation of raw + EMA weights in one pass (images decoded once) against two separate passes.

``pipeline.evaluate.evaluate`` scores every model of a run on the same decoded batches. The
baseline is what a naive loop does: one full pass (read, decode, resize, forward) per weights
file. Both sides run the same code on the same shards (the digits val split, sharded here unless
``--data`` is given) with a randomly initialised model; repeats are interleaved and medians
reported. Also printed: forward-only images/s per model (what ``throughput_img_s`` reports).

    .venv/bin/python benchmarks/evaluate_throughput.py --model coatnet_pico --img-size 48 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import coatnet  # noqa: E402
from pipeline.artifacts import read_manifest  # noqa: E402
from pipeline.data import shard_dataset  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402


def make_run(out: Path, name: str, img_size: int, num_classes: int) -> str:
    from safetensors.torch import save_file

    model = coatnet.create_model(name, num_classes=num_classes, img_size=img_size)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    save_file(sd, str(out / "model_ema.safetensors"))
    (out / "model_config.json").write_text(json.dumps({"name": name, "num_classes": num_classes, "img_size": img_size,
                                                       "config": model.config.to_dict()}))
    (out / "preprocessing.json").write_text(json.dumps({"img_size": img_size, "mean": [0.5] * 3, "std": [0.5] * 3}))
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="coatnet_pico")
    p.add_argument("--img-size", type=int, default=48)
    p.add_argument("--data", default=None, help="dataset root (default: the digits, sharded into a temp dir)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = shard_dataset("digits", str(Path(tmp, "digits")), executor="local", progress=False).uri
        n_cls = read_manifest(data).num_classes
        run = make_run(Path(tmp, "run"), args.model, args.img_size, n_cls)
        kw = dict(split=args.split, batch_size=args.batch_size, num_workers=args.workers, log_mlflow=False,
                  progress=False)
        evaluate(run, data, weights=("raw",), out_dir=Path(tmp, "warm"), **kw)  # imports, caches, page cache
        one, two, fwd = [], [], {"raw": [], "ema": []}
        for r in range(args.repeats):
            t = time.perf_counter()
            rep = evaluate(run, data, weights=("raw", "ema"), out_dir=Path(tmp, f"a{r}"), **kw)
            one.append(time.perf_counter() - t)
            for w in fwd:
                fwd[w].append(rep["weights"][w].get("throughput_img_s", float("nan")))
            t = time.perf_counter()
            for w in ("raw", "ema"):
                evaluate(run, data, weights=(w,), out_dir=Path(tmp, f"b{r}{w}"), **kw)
            two.append(time.perf_counter() - t)
        n = rep["weights"]["raw"]["num_samples"]
    m1, m2 = statistics.median(one), statistics.median(two)
    print(f"{args.model} @ {args.img_size}, {n} images of split '{args.split}', batch {args.batch_size}, "
          f"{args.workers} decode worker(s), {args.repeats} repeats (medians)")
    print(f"one pass, raw+EMA (decode once):   {m1:7.2f} s   {2 * n / m1:8.1f} model-images/s")
    print(f"two passes, raw then EMA (baseline): {m2:5.2f} s   {2 * n / m2:8.1f} model-images/s")
    print(f"speed-up one pass / two passes: {m2 / m1:.2f}x")
    print(f"forward-only images/s: raw {statistics.median(fwd['raw']):.1f}, ema {statistics.median(fwd['ema']):.1f}")


if __name__ == "__main__":
    main()
