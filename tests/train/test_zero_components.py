"""ZeRO at scale, component by component, on 2 CPU ranks over gloo (tests/train/zero_worker.py): the
partitioned ZeRO-3 build, ``model.init_weights`` into partitions, and the sharded EMA under ZeRO-2 and 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.distributed import free_port

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           str(REPO / "tests" / "train" / "zero_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(660)
def test_zero3_build_is_partitioned_and_equals_the_unpartitioned_one(results):
    r = results["init"]
    assert results["world_size"] == 2
    # No rank holds a whole parameter: each keeps its half (ceil) of every one, the module tensors are empty.
    assert r["partitioned"]
    assert r["held_elements"] <= r["total_elements"] // 2 + 71
    # Same seed, same weights as coatnet.create_model on one rank (every parameter and buffer, bit for bit).
    assert r["mismatched"] == []
    # A fine-tuning init file (another resolution: tables resized) loads into the partitions like into a model.
    assert r["tables_resized"] and r["init_weights_mismatched"] == []


def test_zero3_build_of_a_timm_model_is_partitioned_and_equals_the_unpartitioned_one(results):
    r = results["init_timm"]
    assert r["partitioned"] and r["mismatched"] == []


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_ema_export_equals_a_reference_ema(results, stage):
    r = results[f"ema_{stage}"]
    # Each rank keeps its own partition of the fp32 masters (half of the model, up to alignment padding).
    assert r["ema_numel"] <= r["model_numel"] // 2 + 64
    # zero_to_fp32 on the checkpoint's EMA shards == the EMA of the gathered fp32 masters, kept on one rank.
    assert r["keys_match"]
    assert r["max_abs_diff"] <= 1e-6
    assert r["max_abs_ema_minus_weights"] > 1e-4  # it is an average, not a copy of the weights
    # Back from the checkpoint, and from the universal checkpoint (per-parameter tensors, re-cut).
    assert r["reload_equal"] and r["reload_updates"] == 4
    assert r["universal_max_abs_diff"] == 0.0 and r["universal_updates"] == 4
