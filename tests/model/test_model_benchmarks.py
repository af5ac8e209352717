"""The benchmark scripts run end to end on CPU and write what they promise (figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import coatnet

ROOT = Path(__file__).resolve().parents[2]


def load(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_throughput_writes_json_and_markdown(tmp_path: Path) -> None:
    bench = load("benchmarks/model_throughput.py")
    rc = bench.main(["--models", "coatnet_pico", "--img-size", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
                     "--num-classes", "10", "--peak", "1.0", "--json", str(tmp_path / "r.json"),
                     "--md", str(tmp_path / "r.md"), "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    (row,) = res["rows"]
    assert row["impl"] == "this project" and row["batch"] == 2 and len(row["step_ms_all"]) == 2
    assert row["images_per_s"] > 0 and row["achieved_tflops"] > 0
    assert row["utilisation"] == pytest.approx(row["achieved_tflops"] / 1.0)
    assert row["gmacs_per_image"] == pytest.approx(coatnet.count("coatnet_pico", 32, num_classes=10)[1] / 1e9)
    assert "| this project | coatnet_pico | 2 |" in (tmp_path / "r.md").read_text()


def test_timm_peer_names() -> None:
    bench = load("benchmarks/model_throughput.py")
    assert bench.timm_name("coatnet_2") == "coatnet_2_224"
    assert bench.timm_name("coatnet_7") is None and bench.timm_name("coatnet_pico") is None
