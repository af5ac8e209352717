"""A damaged checkpoint (a file cut short, a file missing) is named in one line, kept aside, and the run resumes
from the newest intact one with the samples and losses of a run never interrupted; with none intact, a
one-line error; `coatnet checkpoints verify` reports each checkpoint's state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import read_losses, tiny

from pipeline.cli import main
from pipeline.train import launch, manifest
from pipeline.train.checkpoint import CheckpointManager, ResumeError

SMALL = ["data.train_split=minival", "data.eval_split=minival", "train.global_batch_size=16",
         "train.micro_batch_size=16", "eval.max_samples=16", "ema.decay=0.9", "checkpoint.interval_steps=2",
         "checkpoint.keep_last=3", "train.record_samples=true", "deepspeed.zero_stage=2"]
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    """An uninterrupted 6-step run, and a 4-step run of the same recipe (checkpoints at 2 and 4) to damage."""
    base = tmp_path_factory.mktemp("integrity")
    ref = launch(RECIPE, tiny(digits_shards, base / "ref", *SMALL, "train.max_steps=6"), launcher="local", nproc=1)
    cut = tiny(digits_shards, base / "cut", *SMALL, "train.max_steps=6")
    launch(RECIPE, [*cut, "train.stop_after_steps=4"], launcher="local", nproc=1)
    return ref, base / "cut", cut


def test_every_checkpoint_has_a_manifest_that_its_files_pass(runs):
    _, cut, _ = runs
    for tag in ("step_00000002", "step_00000004"):
        d = cut / "checkpoints" / tag
        files = json.loads((d / manifest.MANIFEST).read_text())["files"]
        assert any(n.startswith("ema/") for n in files) and "rank_00000.pt" in files
        assert any(n.endswith("_optim_states.pt") for n in files)
        assert manifest.problem(d) is None


@pytest.mark.parametrize("damage", ["truncated model states", "missing ema file", "missing rank file"])
def test_the_manifest_names_what_is_wrong(runs, tmp_path, damage):
    _, cut, _ = runs
    d = tmp_path / "step"
    shutil.copytree(cut / "checkpoints" / "step_00000004", d)
    if damage == "truncated model states":
        f = next(d.glob("*model_states.pt"))
        f.write_bytes(f.read_bytes()[:100])
        assert manifest.problem(d) == f"{f.name} is 100 bytes, the manifest says " \
            f"{(cut / 'checkpoints' / 'step_00000004' / f.name).stat().st_size}"
    elif damage == "missing ema file":
        f = next(p for p in (d / "ema").rglob("*") if p.is_file())
        f.unlink()
        assert manifest.problem(d) == f"{f.relative_to(d)} is missing"
    else:
        (d / "rank_00000.pt").unlink()
        assert manifest.problem(d) == "rank_00000.pt is missing"


@pytest.mark.timeout(300)
def test_a_truncated_checkpoint_is_set_aside_and_the_run_goes_on_from_the_one_before(runs, capfd):
    ref, cut, resume_overrides = runs
    ckpt = cut / "checkpoints"
    f = next((ckpt / "step_00000004").glob("*model_states.pt"))
    f.write_bytes(f.read_bytes()[:100])  # what a full disk or a cut copy leaves
    assert main(["checkpoints", "verify", str(cut)]) == 1
    printed = capfd.readouterr().out
    assert "step_00000002  step 2  intact" in printed and "step_00000004  step 4  damaged: " in printed

    resumed = launch(RECIPE, resume_overrides, launcher="local", nproc=1, resume="auto")
    out = capfd.readouterr().out
    assert f"checkpoint step_00000004 is damaged: {f.name} is 100 bytes" in out
    assert resumed.finished and resumed.step == 6
    assert (ckpt / "damaged" / "step_00000004" / f.name).is_file()  # kept, not deleted
    # From step 2 on, the losses of the run never interrupted.
    got, want = read_losses(cut), read_losses(ref.output_dir)
    for step in (4, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    assert main(["checkpoints", "verify", str(cut)]) == 0


def test_with_no_intact_checkpoint_resume_is_a_one_line_error(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "damaged" / "step_00000002").mkdir(parents=True)
    mgr = CheckpointManager(ckpt, keep_last=2, upload_uri=None, rank=0, local_rank=0)
    with pytest.raises(ResumeError, match="no intact checkpoint .* --resume none"):
        mgr.find("auto")
    assert main(["checkpoints", "verify", str(tmp_path)]) == 2  # no step directories at all: a user error
