"""`coatnet shard`: shard an image source into MDS datasets (pipeline.data.shard_dataset)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shard",
        help="shard an image dataset into MDS shards (local or s3://) on Ray workers",
        description="Read, preprocess and write an image source (local or s3://) as mosaicml-streaming shards "
        "with a manifest, on Ray workers that read their own tars and folders straight from the store. Writes "
        "OUT/cfg-<config hash>/ and points OUT/LATEST at it; re-running a finished config is a no-op, an "
        "interrupted one resumes.",
    )
    p.add_argument("--source", required=True,
                   help="imagefolder:ROOT | imagenet21k:ROOT[,synsets=SUBSET] | imagenet1k:ROOT (ROOT: a path or "
                        "s3://bucket/prefix) | digits[:size=32] | digits21k[:rotations=4,size=32] | "
                        "synthetic:n=N,classes=C (benchmarks)")
    p.add_argument("--out", required=True, help="local directory or s3://bucket/prefix")
    p.add_argument("--max-side", type=int, default=320, help="shorter side is resized to at most this (default 320)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="parallel workers (default: all CPUs of the Ray cluster)")
    p.add_argument("--minival-fraction", type=float, default=None, help="share of train held out as minival")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address", default=None, help="ray://host:10001 or auto; default RAY_ADDRESS or a local Ray")
    p.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit (pixels)")
    p.add_argument("--max-bad-fraction", type=float, default=None, help="fail when more inputs are bad (default 0.05)")
    p.add_argument("--part-size", type=int, default=None,
                   help="about how many images one task writes (default: ~32 parts, at most 8192 images each)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run whose source changed")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    from pipeline.data import format_summary, shard_dataset

    optional = {
        "minival_fraction": args.minival_fraction,
        "max_pixels": args.max_pixels,
        "max_bad_fraction": args.max_bad_fraction,
        "part_size": args.part_size,
    }
    result = shard_dataset(
        args.source,
        args.out,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
        seed=args.seed,
        ray_address=args.ray_address,
        executor="local" if args.local else "ray",
        progress=not args.no_progress,
        restart=args.restart,
        **{k: v for k, v in optional.items() if v is not None},
    )
    if result.skipped:
        print(f"already done, nothing to do: {result.uri}")
    print(format_summary(result.manifest))
    print(f"\ndataset root: {result.uri}")
    return 0
