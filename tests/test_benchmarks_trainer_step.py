"""benchmarks/model_throughput.py --trainer: the pipeline trainer's DeepSpeed step beside the bare step, in its
tiny CPU form (fp32, coatnet_pico, two steps); without deepspeed the row is skipped with a message and the rest
runs. A run with the trainer row is a subprocess: it creates a process group. Figures are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import coatnet

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "model_throughput.py"
ARGS = ["--models", "coatnet_pico", "--img-size", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
        "--num-classes", "10", "--no-timm", "--trainer", "--device", "cpu"]


def _run(code: list[str], tmp_path: Path) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "r.json"
    proc = subprocess.run([*code, "--json", str(out), "--md", str(tmp_path / "r.md")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), (tmp_path / "r.md").read_text()


@pytest.mark.slow
def test_trainer_row_runs_the_pipelines_deepspeed_step_beside_the_bare_step(tmp_path):
    res, md = _run([sys.executable, str(BENCH), *ARGS], tmp_path)
    bare, trainer = res["rows"]
    assert bare["impl"] == "this project" and trainer["impl"] == "pipeline trainer"
    assert trainer["model"] == "coatnet_pico" and trainer["batch"] == 2 and len(trainer["step_ms_all"]) == 2
    assert trainer["dtype"] == "fp32" and trainer["zero_stage"] == 2 and trainer["recipe"].endswith("demo.yaml")
    # Built by the pipeline's engine: DeepSpeed's ZeRO optimizer around the recipe's AdamW.
    assert trainer["optimizer"] == "AdamW in DeepSpeedZeroOptimizer"
    assert trainer["gmacs_per_image"] == pytest.approx(coatnet.count("coatnet_pico", 32, num_classes=10)[1] / 1e9)
    assert trainer["images_per_s"] > 0 and trainer["input_ms_median"] > 0
    (q,) = res["ratios"]
    assert q["trainer_vs_ours"] == pytest.approx(trainer["images_per_s"] / bare["images_per_s"])
    assert "ratio" not in q  # no timm row asked for
    assert "| pipeline trainer | coatnet_pico | 2 | fp32 |" in md and "trainer step / bare step" in md


def test_trainer_row_is_skipped_with_a_message_without_deepspeed(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    spec = importlib.util.spec_from_file_location("model_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main([*ARGS, "--json", str(out), "--md", str(tmp_path / "r.md")]) == 0
    res = json.loads(out.read_text())
    bare, trainer = res["rows"]
    assert bare["images_per_s"] > 0  # the bare row still ran
    assert "deepspeed is not installed" in trainer["skipped"] and "fetch-wheels.sh" in trainer["skipped"]
    assert res["ratios"] == []
    assert "skipped: deepspeed is not installed" in (tmp_path / "r.md").read_text()


def test_every_gpu_harness_section_takes_the_options_it_is_given(tmp_path):
    """run_h200.sh end to end with its python replaced by tests/harness_argv.py: each section's entry point parses
    exactly the options the harness passes it (a renamed or dropped option breaks here, not on the lent GPU)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": f"{sys.executable} {ROOT / 'tests' / 'harness_argv.py'}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu/run_h200.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text().splitlines()
    sections = {"check_cuda", "c02_eager", "c02_trainer", "c02_compiled", "c5_compiled", "c7_maxbatch", "profile",
                "loader"}
    assert {line.split()[0] for line in status} == sections
    assert all(line.endswith(" rc=0") for line in status), status
    parsed = (out / "parsed.txt").read_text().splitlines()
    assert len(parsed) == len(sections)
    assert any("model_throughput.py" in p and "--trainer" in p for p in parsed)
