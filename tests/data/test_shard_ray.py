"""shard_dataset on a real local Ray (one session shared by these tests), reading from and writing to the S3 server:
digits21k, per-synset tars in a bucket with every image accounted for, and a SIGKILLed run resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from shard_helpers import check_accounting, read_split

from pipeline import storage
from pipeline.data import digits, load_manifest, shard_dataset

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_digits21k_sharded_to_s3_on_ray_reads_back_every_sample_once(ray_session, s3_bucket, tmp_path):
    out = f"{s3_bucket}/digits21k"
    spec = "digits21k:rotations=2,size=16"
    res = shard_dataset(spec, out, workers=2, ray_address=ray_session, progress=False)
    m = res.manifest
    assert res.uri.startswith(out + "/cfg-") and m["run"]["executor"] == "ray" and m["run"]["workers"] == 2
    assert m["num_classes"] == 20 and m["parent_map"] == digits.parent_map(2)
    assert m["parent_classes"] == [str(d) for d in range(10)]
    keys, total = [], 0
    for split in ("train", "minival", "val"):
        samples = read_split(res.uri, split, tmp_path)
        assert len(samples) == m["splits"][split]["samples"]
        total += len(samples)
        for s in samples[:200]:
            assert m["classes"][s["label"]] == s["synset"] and s["key"].startswith(f"{'train' if split != 'val' else 'val'}/")
        keys += [s["key"] for s in samples]
    assert total == len(set(keys)) == 2 * digits.num_samples()
    again = shard_dataset(spec, out, workers=2, ray_address=ray_session, progress=False)
    assert again.skipped and again.uri == res.uri


@pytest.mark.timeout(300)
def test_tars_in_a_bucket_sharded_to_a_bucket_on_ray_account_for_every_image(in21k_bucket, ray_session, tmp_path):
    out = f"{in21k_bucket['bucket']}/shards"
    res = shard_dataset(in21k_bucket["source"], out, workers=2, ray_address=ray_session, part_size=12)
    assert res.manifest["run"]["executor"] == "ray" and res.manifest["splits"]["train"]["parts"] >= 4
    assert res.manifest["num_classes"] == 21841
    check_accounting(res, in21k_bucket, tmp_path)
    dup = next(q for q in res.manifest["quarantined"] if q["kind"] == "duplicate")
    assert in21k_bucket["expected"][dup["key"]] == "duplicate" and "same bytes as" in dup["reason"]


@pytest.mark.timeout(300)
def test_run_killed_mid_write_resumes_on_ray_without_losing_or_repeating_an_image(in21k_bucket, ray_session,
                                                                                   faulty_proxy, tmp_path):
    out = f"{in21k_bucket['bucket']}/killed"
    script = ("from pipeline.data import shard_dataset\n"
              f"shard_dataset({in21k_bucket['source']!r}, {out!r}, executor='local', part_size=5,"
              " minival_fraction=0.0, progress=False)\n")
    with faulty_proxy(delay_s=0.05) as slow:  # slow requests, so the kill lands mid-job
        (tmp_path / "tmp").mkdir()  # the killed job's staging folders land here, not in the system's /tmp
        env = {**os.environ, "S3_ENDPOINT_URL": slow.url, "TMPDIR": str(tmp_path / "tmp")}
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                if sum(o.uri.endswith(".json") for o in storage.list_objects(out) if "/_work/parts/" in o.uri) >= 3:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group: no clean-up code runs
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not any(o.uri.endswith("/manifest.json") for o in storage.list_objects(out))

    res = shard_dataset(in21k_bucket["source"], out, workers=2, ray_address=ray_session, part_size=5,
                        minival_fraction=0.0, progress=False)
    assert 3 <= res.resumed_parts and res.written_parts >= 1
    check_accounting(res, in21k_bucket, tmp_path)
    assert load_manifest(out)["manifest_hash"] == res.manifest["manifest_hash"]
    assert not any("/_work/" in o.uri for o in storage.list_objects(out))
