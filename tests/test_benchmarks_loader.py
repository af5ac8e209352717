"""benchmarks/loader_throughput.py runs the trainer's real loader end to end, before and after the uint8 change,
and writes its figures.

Figures are not asserted (speed belongs to benchmarks), only that they are there and consistent.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("loader_throughput", ROOT / "benchmarks" / "loader_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_loader_benchmark_writes_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    out = tmp_path / "loader.json"
    rc = bench.main(["--images", "32", "--batch", "4", "--repeats", "1", "--workers", "0", "1",
                     "--recipes", "coatnet_2_in1k", "--img-size", "64", "--gpu-rates", "m=100",
                     "--target", "2", "--gpu-decode", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["path"], r["workers"]): r for r in res["rows"]}
    assert set(rows) == {("before", 0), ("before", 1), ("after", 0), ("after", 1)}
    for (path, _), r in rows.items():
        assert r["recipe"] == "coatnet_2_in1k"
        assert r["images_per_s"] > 0 and r["cpu_ms_per_image"] > 0
        assert r["images_per_s_per_core"] == pytest.approx(1e3 / r["cpu_ms_per_image"], rel=0.02)
        # The real transforms ran: crops at img_size, 3 channels, the batch size asked for; float32 NCHW from
        # the workers before, uint8 NHWC now.
        assert (r["batch_dtype"], r["batch_shape"]) == \
            (("float32", [4, 3, 64, 64]) if path == "before" else ("uint8", [4, 64, 64, 3]))
    assert rows["after", 1]["images_per_s_per_worker"] == pytest.approx(rows["after", 1]["images_per_s"], rel=1e-3)
    assert rows["after", 0]["images_per_s_per_worker"] is None
    ratios = {q["workers"]: q for q in res["ratios"]}
    assert set(ratios) == {0, 1}
    for w, q in ratios.items():
        assert q["per_core_ratio"] == pytest.approx(
            rows["before", w]["cpu_ms_per_image"] / rows["after", w]["cpu_ms_per_image"], rel=0.01)
        assert q["images_per_s_ratio"] == pytest.approx(
            rows["after", w]["images_per_s"] / rows["before", w]["images_per_s"], rel=0.01)
    assert set(res["bare_steps"]["coatnet_2_in1k"]) == {"before", "uint8 out", "+ CPU-only seed", "after"}
    assert res["device_step_on_cpu_ms_per_image"]["coatnet_2_in1k"] > 0
    dec = res["decoders"]
    assert set(dec["cpu_ms_per_image"]) == {"pil_convert (before)", "pil (after)", "torchvision_cpu",
                                            "torchvision_cpu_to_pil"}
    assert dec["torchvision_vs_pil_max_abs"] >= 0 and 0 <= dec["torchvision_vs_pil_differing_fraction"] <= 1
    keep = {k["consumer"]: k for k in res["keep_up"]}
    assert set(keep) == {"timm", "target 2x"} and keep["timm"]["path"] == "after"
    assert keep["timm"]["consumes_images_per_s"] == 100 and keep["target 2x"]["consumes_images_per_s"] == 200
    # Cores needed come from the cost per image with workers (how training runs), here the only such row.
    cpu_ms = rows["after", 1]["cpu_ms_per_image"]
    assert keep["timm"]["cpu_ms_per_image"] == cpu_ms
    assert keep["timm"]["cores_needed"] == pytest.approx(100 * cpu_ms / 1e3, abs=0.06)
    assert keep["target 2x"]["cores_needed"] == pytest.approx(200 * cpu_ms / 1e3, abs=0.06)
    assert keep["timm"]["projected_over_consumed"] == pytest.approx(16 * 1e3 / cpu_ms / 100, rel=1e-2)
    best = max((r for (p, _), r in rows.items() if p == "after"), key=lambda r: r["images_per_s"])
    assert keep["timm"]["delivered_over_consumed"] == pytest.approx(best["images_per_s"] / 100, abs=1e-3)
    printed = capsys.readouterr().out
    assert "cores needed" in printed and "coatnet_2_in1k" in printed and "per core before" in printed
    import torch

    if torch.cuda.is_available():
        assert res["gpu_decode"]["available"] and res["gpu_decode"]["cuda_vs_pil"] > 0
        assert res["gpu_decode"]["cuda_vs_pil_max_abs"] >= 0
    else:
        assert res["gpu_decode"] == {"available": False, "reason": "CUDA is not available on this machine"}
        assert "--gpu-decode: unavailable, skipped" in printed


def test_gpu_rates_parse() -> None:
    bench = load_bench()
    assert bench.parse_rates(["coatnet_2=882", "x=1.5"]) == {"coatnet_2": 882.0, "x": 1.5}
    with pytest.raises(SystemExit, match="NAME=IMAGES_PER_S"):
        bench.parse_rates(["882"])
