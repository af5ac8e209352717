"""benchmarks/pretrain_e2e.py in its CPU form: the GPU end-to-end section (not yet wired into run_h200.sh) with
``--device cpu`` and tiny sizes (coatnet_pico at 32 px, one rank, 8 steps), run for real: `coatnet shard`, two
`coatnet pretrain` launches through the streaming loader with a checkpoint and a resume between them, `coatnet
evaluate`, and the bare step beside the loop's metrics. Figures are not asserted, only that they are there and
consistent with the run's own files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pretrain_e2e.py"
TINY = ["--device", "cpu", "--model", "coatnet_pico", "--img-size", "32", "--batch", "32",
        "--source", "digits21k:rotations=1,size=32", "--steps", "8", "--first-steps", "4", "--checkpoint-every", "2",
        "--log-every", "1", "--workers", "1", "--threads", "1", "--bare-steps", "5", "--bare-warmup", "1",
        "schedule.warmup_epochs=0", "schedule.warmup_steps=2"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_end_to_end_shards_checkpoints_resumes_evaluates_and_compares_with_the_bare_step(tmp_path):
    work, out = tmp_path / "work", tmp_path / "e2e.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--work", str(work), "--json", str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    # Shards: digits21k's 1797 images, written as MDS files under the dataset root the shard command printed.
    root = Path(res["shard"]["root"])
    assert root.parent == work / "shards" and res["shard"]["images"] == 1797
    assert res["shard"]["shards"] == len(list(root.rglob("*.mds"))) > 0

    # The first run stopped at 4 with a checkpoint of step 4; the second resumed from it and finished at 8.
    run = work / "pretrain"
    assert res["pretrain"]["stopped_at"] == 4 and res["pretrain"]["total_steps"] == 8
    assert Path(res["pretrain"]["checkpoint"]).name.endswith("4")
    assert res["resume"]["resumed_at"] == 4 and res["resume"]["finished_at"] == 8
    assert f"resumed from {res['pretrain']['checkpoint']} at step 4" in (work / "logs" / "resume.log").read_text()
    assert res["resume"]["checkpoints_kept"] == [6, 8]  # keep_last 2, the resumed run's own
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # one curve: 1-4, then 5-8 resumed
    assert (run / "model.safetensors").is_file()

    # Evaluation of the exported weights, on the 359 val images.
    assert 0.0 <= res["evaluate"]["top1"] <= 1.0 and res["evaluate"]["samples"] == 359
    assert re.search(r"^evaluate   val top-1 \d\.\d{4} over 359 images", proc.stdout, re.M)

    # The loop's windows (less each run's first: steps 1 and 5) beside the bare step, and the ratios printed last.
    loop, bare, ratios = res["loop"], res["bare"], res["ratios"]
    assert loop["windows"] == 6 and loop["world_size"] == 1 and 0.0 <= loop["data_wait_frac"] < 1.0
    assert bare["model"] == "coatnet_pico" and bare["batch"] == 32 and bare["img_size"] == 32
    assert ratios["loop_vs_bare"] == pytest.approx(loop["images_per_s"] / bare["images_per_s"])
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"ratio      real loop / bare step (\d+\.\d\d)x, data-wait share (\d\.\d\d)", last)
    assert m, last
    assert float(m.group(1)) == pytest.approx(ratios["loop_vs_bare"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(ratios["data_wait_share"], abs=0.006)
