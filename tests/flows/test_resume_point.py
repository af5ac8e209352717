"""The flows' resume point is the checkpoint manager's choice (local marker first, then the store's copy)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from flows.tasks import resume_point
from pipeline import storage
from pipeline.train.checkpoint import COMPLETE, LATEST, tag_for


def _plan(run_dir, upload_uri=None):
    ckpt = SimpleNamespace(keep_last=2, upload_uri=upload_uri)
    return SimpleNamespace(checkpoint_dir=str(run_dir / "checkpoints"), train_config=SimpleNamespace(checkpoint=ckpt))


def _complete(root, step):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / COMPLETE).write_text(json.dumps({"step": step}))


def test_local_marker_then_newest_complete(tmp_path):
    assert resume_point(_plan(tmp_path)) is None
    ckpts = tmp_path / "checkpoints"
    _complete(ckpts, 4)
    _complete(ckpts, 8)
    (ckpts / tag_for(12)).mkdir()  # an interrupted save: no marker
    assert resume_point(_plan(tmp_path)) == 8
    (ckpts / LATEST).write_text(tag_for(4))  # what resume="auto" loads
    assert resume_point(_plan(tmp_path)) == 4


def test_remote_copy_without_downloading(tmp_path, s3_bucket):
    remote = f"{s3_bucket}/run/checkpoints"
    storage.write_text(storage.join(remote, LATEST), tag_for(6))
    assert resume_point(_plan(tmp_path, remote)) is None  # its marker of completion is missing
    storage.write_text(storage.join(remote, tag_for(6), COMPLETE), "{}")
    assert resume_point(_plan(tmp_path, remote)) == 6
    assert not (tmp_path / "checkpoints").exists()
