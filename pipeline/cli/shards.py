"""`coatnet shards verify|info URI`: check or summarise a sharded dataset."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("shards", help="verify or describe a sharded dataset")
    sub = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="re-read the manifest and every shard; exit 1 on any mismatch")
    v.add_argument("uri", help="dataset root, or the --out given to `coatnet shard`")
    v.set_defaults(func=verify)
    i = sub.add_parser("info", help="print the dataset's summary table")
    i.add_argument("uri")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=info)


def verify(args: argparse.Namespace) -> int:
    # lazy: `coatnet --help` imports every sub-command module; this one pulls in torch (see pipeline.cli)
    from pipeline.data import verify_shards

    report = verify_shards(args.uri)  # a missing dataset: ManifestNotFound, one line from pipeline.cli.main
    print(report.summary())
    return 0 if report.ok else 1


def info(args: argparse.Namespace) -> int:
    # lazy: keeps `coatnet --help` light, as above
    from pipeline.data import format_summary, load_manifest

    manifest = load_manifest(args.uri)
    print(json.dumps(manifest, indent=1) if args.json else format_summary(manifest))
    return 0
