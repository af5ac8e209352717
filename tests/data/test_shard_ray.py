"""shard_dataset on a real local Ray (one session shared by these tests), writing to the S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from shard_helpers import read_split

from pipeline import storage
from pipeline.data import digits, load_manifest, shard_dataset, verify_shards

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_digits21k_sharded_to_s3_on_ray_reads_back_every_sample_once(ray_session, s3_bucket, tmp_path):
    out = f"{s3_bucket}/digits21k"
    res = shard_dataset("digits21k", out, workers=2, ray_address=ray_session, progress=False)
    m = res.manifest
    assert res.uri.startswith(out + "/cfg-") and m["run"]["executor"] == "ray" and m["run"]["workers"] == 2
    assert m["num_classes"] == 40 and m["parent_map"] == digits.parent_map(4)
    assert m["parent_classes"] == [str(d) for d in range(10)]
    keys, total = [], 0
    for split in ("train", "minival", "val"):
        samples = read_split(res.uri, split, tmp_path)
        assert len(samples) == m["splits"][split]["samples"]
        total += len(samples)
        for s in samples[:200]:
            assert m["classes"][s["label"]] == s["synset"] and s["key"].startswith(f"{'train' if split != 'val' else 'val'}/")
        keys += [s["key"] for s in samples]
    assert total == len(set(keys)) == 4 * digits.num_samples()
    again = shard_dataset("digits21k", out, workers=2, ray_address=ray_session, progress=False)
    assert again.skipped and again.uri == res.uri


@pytest.mark.timeout(300)
def test_job_killed_mid_write_resumes_without_duplicates_or_losses(ray_session, s3_bucket, faulty_proxy, tmp_path):
    out = f"{s3_bucket}/killed"
    script = ("from pipeline.data import shard_dataset\n"
              f"shard_dataset('digits', {out!r}, executor='local', part_size=100, progress=False)\n")
    with faulty_proxy(delay_s=0.05) as slow:  # slow requests, so the kill lands mid-job
        (tmp_path / "tmp").mkdir()  # the killed job's staging folders land here, not in the system's /tmp
        env = {**os.environ, "S3_ENDPOINT_URL": slow.url, "TMPDIR": str(tmp_path / "tmp")}
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                done = [o for o in storage.list_objects(out) if "/_work/parts/" in o.uri]
                if len(done) >= 3:
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

    res = shard_dataset("digits", out, workers=2, ray_address=ray_session, progress=False)
    assert 3 <= res.resumed_parts < res.resumed_parts + res.written_parts
    assert verify_shards(res.uri).ok
    keys = [s["key"] for split in ("train", "minival", "val") for s in read_split(res.uri, split, tmp_path)]
    assert len(keys) == len(set(keys)) == digits.num_samples()
    assert load_manifest(out)["manifest_hash"] == res.manifest["manifest_hash"]
    assert not any("/_work/" in o.uri for o in storage.list_objects(out))
