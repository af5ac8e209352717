"""shard_dataset end to end in-process (executor="local"): bad input, duplicates, idempotence, verify, S3 faults,
and the one-line errors of the command line.

The Ray executor runs the very same list/plan/write functions; tests/data/test_shard_ray.py covers it.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
from PIL import Image
from shard_helpers import check_accounting, encode, make_image, read_split, write_image

from pipeline import storage
from pipeline.cli import main as cli_main
from pipeline.data import ShardError, SourceError, load_manifest, shard_dataset, verify_shards
from pipeline.storage import StorageError


@pytest.fixture
def malformed_corpus(tmp_path):
    """Two classes of good images in many modes and formats, plus one of each kind of bad input."""
    root = tmp_path / "corpus"
    good = []
    for i, (fmt, mode) in enumerate([("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA"),
                                     ("JPEG", "CMYK"), ("PNG", "L"), ("TIFF", "RGB"), ("JPEG", "RGB")]):
        cls = "cat" if i % 2 else "dog"
        good.append(write_image(root / cls / f"good{i}.{fmt.lower()}", i, fmt, mode))
    write_image(root / "dog" / "big.jpg", 77, "JPEG", size=(900, 700))  # resized, still good
    good.append(root / "dog" / "big.jpg")
    (root / "cat" / "zero.jpg").write_bytes(b"")
    full = encode(make_image(90, (64, 64)), "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "dog" / "notes.jpg").write_text("not an image at all")
    os.symlink(root / "nowhere.jpg", root / "dog" / "dangling.jpg")  # unreadable path
    (root / "dog" / "bomb.png").write_bytes(encode(Image.new("L", (1000, 1000)), "PNG"))
    shutil.copy(good[0], root / "dog" / "good0_copy.jpeg")  # duplicate content (the first key is kept)
    (root / "bird").mkdir()  # empty class folder
    write_image(root / "cat" / os.fsdecode(b"\xff\xfe.jpg"), 91)  # a name that is not UTF-8
    return root, good


def test_malformed_files_are_quarantined_with_reasons_and_good_files_land(malformed_corpus, tmp_path):
    root, good = malformed_corpus
    res = shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), executor="local", max_pixels=700_000,
                        max_bad_fraction=0.6, minival_fraction=0.0, progress=False)
    m = res.manifest
    kinds = {q["key"].rsplit("/", 1)[-1]: q["kind"] for q in m["quarantined"]}
    assert kinds == {
        "zero.jpg": "empty_file", "truncated.jpg": "truncated", "notes.jpg": "not_image",
        "dangling.jpg": "unreadable", "bomb.png": "too_many_pixels", "good0_copy.jpeg": "duplicate",
        "bird": "empty_class", "??.jpg": "bad_name",
    }
    assert all(q["reason"] for q in m["quarantined"])
    dup = next(q for q in m["quarantined"] if q["kind"] == "duplicate")
    assert dup["reason"] == "same bytes as train/dog/good0.jpeg"
    assert m["inputs"] == {"listed": 16, "written": len(good), "quarantined": 6, "duplicates": 1, "masked": 0,
                           "bad_fraction": 0.375}
    assert m["classes"] == ["bird", "cat", "dog"] and m["splits"]["train"]["class_counts"] == [0, 4, 5]
    samples = read_split(res.uri, "train", tmp_path)
    assert sorted(s["key"] for s in samples) == sorted(f"train/{p.parent.name}/{p.name}" for p in good)
    for s in samples:
        img = Image.open(io.BytesIO(s["image"]))
        assert img.mode == "RGB" and min(img.size) <= 320
        assert m["classes"][s["label"]] == s["synset"] == s["key"].split("/")[1]
    assert verify_shards(res.uri).ok


def test_too_many_bad_inputs_fail_with_examples_and_keep_the_parts_written(malformed_corpus, tmp_path):
    root, _ = malformed_corpus
    kw = {"executor": "local", "max_pixels": 700_000, "progress": False}
    with pytest.raises(ShardError) as e:
        shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), max_bad_fraction=0.3, **kw)
    msg = str(e.value)
    assert "6 bad input files" in msg and "of at most 16 listed" in msg and "max_bad_fraction" in msg
    assert "zero.jpg (empty_file" in msg and "dangling.jpg (unreadable" in msg and "truncated.jpg (truncated" in msg
    assert not list((tmp_path / "out").rglob("manifest.json"))
    # Raising the limit finishes from the parts already written: nothing is read again.
    res = shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), max_bad_fraction=0.5, **kw)
    assert res.resumed_parts == res.manifest["splits"]["train"]["parts"] >= 1 and res.written_parts == 0


def test_a_source_that_is_mostly_bad_stops_early(tmp_path):
    # Half the images are not images: once more files are bad than 5% of the whole source could
    # be, the job stops, long before it has read everything.
    with pytest.raises(ShardError, match="bad input files already.*at most 2000 listed") as e:
        shard_dataset("synthetic:n=2000,classes=20,bad_every=2", str(tmp_path / "out"), executor="local",
                      part_size=100, progress=False)
    assert "not_image" in str(e.value)
    done = list((tmp_path / "out").rglob("_work/parts/*.json"))
    assert 1 <= len(done) <= 3  # of 20 parts


def test_duplicates_val_copies_dropped_from_train_repeats_across_parts_masked(tmp_path):
    root = tmp_path / "tree"
    for cls, seeds in {"a": [1, 2, 3], "b": [4, 5], "c": [6, 7]}.items():
        for s in seeds:
            write_image(root / "train" / cls / f"{cls}{s}.png", s, "PNG")
    write_image(root / "val" / "a" / "v0.png", 100, "PNG")
    shutil.copy(root / "val" / "a" / "v0.png", root / "train" / "b" / "b_val_copy.png")  # val wins, dropped
    shutil.copy(root / "train" / "a" / "a2.png", root / "train" / "a" / "a2_again.png")  # same part: dropped
    shutil.copy(root / "train" / "a" / "a1.png", root / "train" / "c" / "c_copy.png")  # another part: masked
    res = shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), executor="local", part_size=1,
                        minival_fraction=0.0, progress=False)
    m = res.manifest
    assert m["splits"]["train"]["parts"] == 3  # a unit a part: the masked copy is found by the reduce step
    dups = {q["key"]: q["reason"] for q in m["quarantined"] if q["kind"] == "duplicate"}
    assert dups == {"train/b/b_val_copy.png": "same bytes as val/a/v0.png",
                    "train/a/a2_again.png": "same bytes as train/a/a2.png",
                    "train/c/c_copy.png": "same bytes as train/a/a1.png (masked: still in the train shards)"}
    assert m["inputs"] == {"listed": 11, "written": 8, "quarantined": 0, "duplicates": 3, "masked": 1,
                           "bad_fraction": 0.0}
    train = read_split(res.uri, "train", tmp_path)
    assert len(train) == m["splits"]["train"]["samples"] == 8  # 7 unique + the masked copy
    assert [train[i]["key"] for i in m["splits"]["train"]["masked"]] == ["train/c/c_copy.png"]
    assert "train/b/b_val_copy.png" not in {s["key"] for s in train}
    assert verify_shards(res.uri).ok


def test_rerun_is_a_noop_and_a_new_config_never_mixes(tmp_path):
    out = str(tmp_path / "out")
    first = shard_dataset("digits", out, executor="local", progress=False)
    assert not first.skipped and first.manifest["splits"]["val"]["samples"] == 359
    again = shard_dataset("digits", out, executor="local", progress=False)
    assert again.skipped and again.uri == first.uri
    assert again.manifest["manifest_hash"] == first.manifest["manifest_hash"]
    other = shard_dataset("digits", out, executor="local", progress=False, jpeg_quality=75, seed=3)
    assert other.uri != first.uri and not other.skipped
    assert load_manifest(first.uri)["config"]["jpeg_quality"] == 90  # untouched
    assert load_manifest(out)["root"] == other.uri  # LATEST follows the last finished config
    assert verify_shards(first.uri).ok and verify_shards(other.uri).ok


def test_invalid_config_and_destinations_fail_before_any_work(tmp_path, s3_endpoint, monkeypatch):
    with pytest.raises(ValueError, match="jpeg_quality"):
        shard_dataset("digits", str(tmp_path / "o"), jpeg_quality=0, executor="local")
    with pytest.raises(SourceError, match="does not exist"):
        shard_dataset(f"imagefolder:{tmp_path / 'missing'}", str(tmp_path / "o"), executor="local")
    (tmp_path / "hollow" / "a").mkdir(parents=True)  # a class folder, but no image anywhere
    with pytest.raises(SourceError, match="no usable image.*empty_class"):
        shard_dataset(f"imagefolder:{tmp_path / 'hollow'}", str(tmp_path / "o"), executor="local")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.mds"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        shard_dataset("digits", str(blocker / "out"), executor="local")
    with pytest.raises(StorageError, match="bucket exists"):
        shard_dataset("digits", "s3://no-such-bucket/x", executor="local")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="credentials"):
        shard_dataset("digits", "s3://any-bucket/x", executor="local")


def test_verify_catches_a_corrupted_shard_on_s3(s3_bucket, tmp_path, capsys):
    res = shard_dataset("digits", f"{s3_bucket}/digits", executor="local", progress=False, part_size=512)
    assert cli_main(["shards", "verify", f"{s3_bucket}/digits"]) == 0
    assert cli_main(["shards", "info", f"{s3_bucket}/digits"]) == 0
    assert "val" in capsys.readouterr().out
    victim = next(s for s in res.manifest["shards"] if s["path"].endswith(".mds"))
    uri = storage.join(res.uri, victim["path"])
    data = bytearray(storage.read_bytes(uri))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    storage.write_bytes(uri, bytes(data))
    report = verify_shards(res.uri)
    assert not report.ok and any(victim["path"] in e and "sha256" in e for e in report.errors)
    assert cli_main(["shards", "verify", res.uri]) == 1
    # An edited manifest (count changed, hash not) is caught too.
    m = json.loads(storage.read_text(storage.join(res.uri, "manifest.json")))
    m["splits"]["val"]["samples"] += 1
    storage.write_text(storage.join(res.uri, "manifest.json"), json.dumps(m))
    errors = verify_shards(res.uri).errors
    assert any("manifest_hash" in e for e in errors) and any("val: index has" in e for e in errors)


def test_transient_s3_errors_are_survived(s3_bucket, faulty_proxy, monkeypatch, tmp_path):
    with faulty_proxy(fail_every=5) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        storage.reset_clients()
        res = shard_dataset("digits", f"{s3_bucket}/flaky", executor="local", progress=False, part_size=1024)
        assert proxy.failed >= 5, proxy.failed  # the failure path really ran
        assert verify_shards(res.uri).ok
    monkeypatch.undo()
    storage.reset_clients()
    keys = [s["key"] for split in ("train", "minival", "val") for s in read_split(res.uri, split, tmp_path)]
    assert len(keys) == len(set(keys)) == 1797


def test_a_tar_stream_cut_off_mid_read_is_read_again(in21k_bucket, faulty_proxy, monkeypatch, tmp_path):
    with faulty_proxy(break_every=4) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        storage.reset_clients()
        res = shard_dataset(in21k_bucket["source"], str(tmp_path / "out"), executor="local", part_size=20,
                            minival_fraction=0.0, progress=False)
        assert proxy.broken >= 3, proxy.broken  # the failure path really ran
    monkeypatch.undo()
    storage.reset_clients()
    assert "unreadable_class" not in res.manifest["quarantine_counts"]  # a broken stream is not a broken tar
    check_accounting(res, in21k_bucket, tmp_path)


def test_unfinished_run_over_a_changed_source_is_refused_unless_restarted(malformed_corpus, tmp_path):
    root, good = malformed_corpus
    kw = {"executor": "local", "max_pixels": 700_000, "progress": False}
    with pytest.raises(ShardError):  # parts written, manifest not: an unfinished run
        shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), max_bad_fraction=0.3, **kw)
    write_image(root / "cat" / "late_arrival.jpg", 4242)
    with pytest.raises(ShardError, match="different listing of the source.*--restart"):
        shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), max_bad_fraction=0.5, **kw)
    res = shard_dataset(f"imagefolder:{root}", str(tmp_path / "out"), max_bad_fraction=0.5, restart=True, **kw)
    assert res.resumed_parts == 0 and res.manifest["inputs"]["written"] == len(good) + 1


def test_cli_shard_prints_the_summary_and_says_when_there_is_nothing_to_do(tmp_path, capsys):
    argv = ["shard", "--source", "digits21k:rotations=2,size=16", "--out", str(tmp_path / "o"), "--local",
            "--no-progress", "--max-side", "64"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "digits21k:rotations=2,size=16  (20 classes)" in out and "images/s" in out and "quarantined" in out
    assert cli_main(argv) == 0
    assert "already done, nothing to do" in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, s3_endpoint, capsys):
    cases = {
        ("shard", "--source", f"imagefolder:{tmp_path / 'missing'}"): "coatnet shard: source folder",
        ("shard", "--source", "digits", "--jpeg-quality", "0"): "coatnet shard: invalid shard config: jpeg_quality",
        ("shards", "verify", str(tmp_path / "missing")): "coatnet shards verify: no manifest.json",
        ("shards", "info", str(tmp_path / "missing")): "coatnet shards info: no manifest.json",
    }
    for argv, start in cases.items():
        extra = ["--out", str(tmp_path / "o"), "--local", "--no-progress"] if argv[0] == "shard" else []
        assert cli_main([*argv, *extra]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and "\n" not in err and "Traceback" not in err, err


def test_unreadable_bucket_sources_are_one_line_errors(s3_endpoint, s3_bucket, faulty_proxy, monkeypatch, tmp_path,
                                                       capsys):
    def shard(source: str) -> str:
        assert cli_main(["shard", "--source", source, "--out", str(tmp_path / "o"), "--local", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        return err

    assert shard("imagenet21k:s3://no-such-bucket/winter21").startswith(
        "coatnet shard: bucket 'no-such-bucket' of s3://no-such-bucket/winter21 does not exist")
    assert shard(f"imagefolder:{s3_bucket}/nothing-here") == (
        f"coatnet shard: source {s3_bucket}/nothing-here does not exist or is empty: no object under that prefix")
    with faulty_proxy(deny=True) as proxy:  # a bucket policy that denies this reader
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        storage.reset_clients()
        assert shard(f"imagenet1k:{s3_bucket}/in1k").startswith(f"coatnet shard: access to {s3_bucket}/in1k")
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.reset_clients()
    assert shard(f"imagenet21k:{s3_bucket}/winter21").startswith("coatnet shard: no AWS credentials to read")
