"""The sizing estimate: calibrated on the one measurement, consistent with itself, and the runbook's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cluster import sizing
from pipeline.cluster.instances import GiB, get_instance

REPO = Path(__file__).resolve().parents[2]


def test_calibration_reproduces_the_measurement():
    # The measured run: 180 TFLOP/s as 6 x MACs at 207 images/s, 55 GiB peak at batch 64 with fp32 AdamW state.
    macs = sizing.MEASURED_TFLOPS * 1e12 / (6 * sizing.MEASURED_IMAGES_PER_S)
    h200 = get_instance("p5e.48xlarge")
    assert sizing.images_per_s_per_gpu(macs, h200, False) == pytest.approx(207.0, rel=1e-6)
    acts = sizing.MEASURED_BATCH * sizing.activation_bytes_per_image("coatnet_5", 224, False)
    assert (acts + 16 * sizing.PAPER_PARAMS["coatnet_5"]) / GiB == pytest.approx(55.0, rel=1e-6)


def test_zero_partitions_model_states():
    p = 1e9
    assert sizing.model_state_bytes(p, 0, 64) == 16e9
    assert sizing.model_state_bytes(p, 3, 64) == pytest.approx(16e9 / 64)
    assert sizing.model_state_bytes(p, 3, 64) < sizing.model_state_bytes(p, 2, 64) < sizing.model_state_bytes(p, 1, 64)
    # Checkpointing stores far less per image; bigger images store more.
    assert sizing.activation_bytes_per_image("coatnet_7", 224, True) < sizing.activation_bytes_per_image("coatnet_7", 224, False) / 4
    assert sizing.activation_bytes_per_image("coatnet_7", 512, False) > 4 * sizing.activation_bytes_per_image("coatnet_7", 224, False)


def test_table_rows_fit_memory_and_batch():
    rows = sizing.sizing_table()
    assert [(r.model, r.img_size) for r in rows] == [(m, s) for m in ("coatnet_5", "coatnet_6", "coatnet_7") for s in (224, 512)]
    for r in rows:
        inst = get_instance(r.instance_type)
        assert r.memory_gib <= inst.gpu_memory_gib * sizing.MEMORY_HEADROOM
        assert r.micro_batch * r.gpus * r.grad_accum == r.global_batch
        assert r.gpu_hours == pytest.approx(r.days * 24 * r.gpus)
    # More nodes: shorter wall-clock for the same model.
    small, big = (sizing.fit("coatnet_7", 224, instance_type="p5.48xlarge", nodes=n) for n in (4, 16))
    assert big.days < small.days


def test_cli_prints_the_table(capsys):
    from pipeline.cli import main

    assert main(["cluster", "sizing"]) == 0
    assert capsys.readouterr().out.strip() == sizing.format_table(sizing.sizing_table()).strip()


def test_runbook_table_is_the_generated_one():
    text = (REPO / "infra" / "README.md").read_text()
    begin, end = "<!-- sizing:begin (coatnet cluster sizing) -->", "<!-- sizing:end -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == sizing.format_table(sizing.sizing_table()).strip()
