"""A dataset written by `coatnet shard` opens with plain mosaicml-streaming: no project code on the reading side.

The reader runs in its own interpreter with only streaming, boto3 and PIL imported, exactly as a user of the
shards would: follow `LATEST`, read `manifest.json`, open each split with
`StreamingDataset(remote=..., local=...)` from the bucket, decode every image with PIL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from shard_helpers import write_image

from pipeline.cli import main as cli_main

pytestmark = [pytest.mark.slow]

READER = textwrap.dedent("""
    import io, json, os, sys, tempfile
    import boto3
    from PIL import Image
    from streaming import StreamingDataset

    out = sys.argv[1]  # s3://bucket/prefix, as given to `coatnet shard --out`
    bucket, _, prefix = out[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    latest = s3.get_object(Bucket=bucket, Key=f"{prefix}/LATEST")["Body"].read().decode().strip()
    root = f"{out}/{latest}"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{latest}/manifest.json")["Body"].read())
    report = {"splits": {}, "project_modules": []}
    for split, info in manifest["splits"].items():
        with tempfile.TemporaryDirectory() as cache:
            ds = StreamingDataset(remote=f"{root}/{split}", local=cache, shuffle=False, batch_size=1)
            rows = []
            for sample in ds:
                img = Image.open(io.BytesIO(sample["image"]))
                img.load()
                rows.append({"key": sample["key"], "label": int(sample["label"]), "synset": sample["synset"],
                             "format": img.format, "mode": img.mode, "size": list(img.size)})
            report["splits"][split] = {"len": len(ds), "manifest_samples": info["samples"], "rows": rows}
            del ds
    report["classes"] = manifest["classes"]
    report["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "coatnet", "flows"))
    print(json.dumps(report))
""")


def test_shards_read_with_plain_streaming_from_the_bucket(s3_bucket, tmp_path):
    src = tmp_path / "corpus"
    formats = [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB")]
    n = 0
    for split, per_class in (("train", 5), ("val", 2)):
        for c, cls in enumerate(("n01440764", "n01443537", "n01484850")):
            for i in range(per_class):
                fmt, mode = formats[(i + c) % len(formats)]
                size = (200, 150) if i == 0 else (48, 40)  # the first of each class gets resized
                write_image(src / split / cls / f"{i}.{fmt.lower()}", 1000 + n, fmt, mode, size=size)
                n += 1
    out = f"{s3_bucket}/shards/plain"
    rc = cli_main(["shard", "--source", f"imagefolder:{src}", "--out", out, "--local", "--max-side", "64",
                   "--minival-fraction", "0.2", "--no-progress"])
    assert rc == 0

    proc = subprocess.run([sys.executable, "-c", READER, out], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["project_modules"] == []
    splits = report["splits"]
    assert set(splits) == {"train", "minival", "val"}
    assert sum(s["len"] for s in splits.values()) == n
    for split, s in splits.items():
        assert s["len"] == s["manifest_samples"] == len(s["rows"]) > 0, split
        for row in s["rows"]:
            assert row["format"] in ("JPEG", "PNG") and min(row["size"]) <= 64, row
            assert report["classes"][row["label"]] == row["synset"] == row["key"].split("/")[-2], row
    assert len({r["key"] for s in splits.values() for r in s["rows"]}) == n  # every image, once
