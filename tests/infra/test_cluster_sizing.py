"""The sizing estimate: calibrated on the one measurement, consistent with itself, and the runbook's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
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


def test_cli_prints_the_tables(capsys):
    assert main(["cluster", "sizing"]) == 0
    want = sizing.format_table(sizing.sizing_table()) + "\n\n" + sizing.format_zero_table(sizing.zero_plans())
    assert capsys.readouterr().out.strip() == want.strip()


@pytest.mark.parametrize("marker,table", [
    ("sizing", lambda: sizing.format_table(sizing.sizing_table())),
    ("zero-sizing", lambda: sizing.format_zero_table(sizing.zero_plans())),
])
def test_runbook_tables_are_the_generated_ones(marker, table):
    text = (REPO / "infra" / "README.md").read_text()
    begin, end = f"<!-- {marker}:begin (coatnet cluster sizing) -->", f"<!-- {marker}:end -->"
    assert begin in text and end in text
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == table().strip()


def test_memory_model_offload_and_ema():
    p = 1e9
    # Offload takes the fp32 masters and moments (12 B/param, partitioned) off the GPU; the EMA goes with them.
    assert sizing.model_state_bytes(p, 3, 8, offload=True) == pytest.approx(4e9 / 8)
    assert sizing.model_state_bytes(p, 2, 8, offload=True) == pytest.approx(2e9 + 2e9 / 8)
    assert sizing.model_state_bytes(p, 3, 8, ema=True) == pytest.approx(20e9 / 8)
    assert sizing.model_state_bytes(p, 3, 8, offload=True, ema=True) == sizing.model_state_bytes(p, 3, 8, offload=True)
    assert sizing.host_state_bytes(p, 3, 8, offload=True, ema=True) == pytest.approx(16e9 / 8)
    with pytest.raises(ValueError, match="offload"):
        sizing.model_state_bytes(p, 0, 8, offload=True)
    # One A100 40 GB cannot hold CoAtNet-7's 16 B/param: only the offloaded optimizer fits.
    kw = dict(instance_type="p4d.24xlarge", nodes=1, gpus_per_node=1, global_batch=64)
    assert sizing.fit("coatnet_7", 224, **kw) is None
    plan = sizing.fit("coatnet_7", 224, offload=(False, True), **kw)
    assert plan.offload and plan.host_gib_per_node > 0 and plan.memory_gib <= 40 * sizing.MEMORY_HEADROOM


def test_measurement_agrees_with_the_state_model():
    """The CPU run of benchmarks/zero_memory.py (fp32) against the same layout in fp32: what is partitioned
    is what the model partitions; the replicated excess is no more than DeepSpeed's reduce bucket."""
    m = sizing.MEASURED_ZERO
    for stage, (replicated, partitioned) in sizing.FP32_STATE_BYTES.items():
        fit = m["fit"][stage]
        assert fit["partitioned"] == pytest.approx(partitioned, rel=0.05), stage
        assert 0 <= fit["replicated"] - replicated <= sizing.BUCKET_BYTES_MAX + 2.0, stage
    assert m["fit"][3]["ratio_2_to_1"] < m["fit"][2]["ratio_2_to_1"] < 1
    # The sharded EMA: 4 B/param over N ranks; its update a small share of a step.
    for n, b in m["ema_bytes_per_param"].items():
        assert b == pytest.approx(sizing.EMA_BYTES / n, rel=0.1)
    assert m["ema_cost_ratio"] < 0.05
    assert 10 < sizing.activation_bytes_per_token_channel_measured() < 200


def test_zero_plans_for_h200_counts():
    rows = sizing.zero_plans()
    h200 = get_instance(sizing.ZERO_INSTANCE)
    want = [(what, m, g) for what, *_ in sizing.ZERO_RUNS for m in ("coatnet_5", "coatnet_6", "coatnet_7")
            for g in sizing.ZERO_GPUS]
    assert [(what, p.model, p.gpus) for what, p in rows] == want
    for what, p in rows:
        assert p.memory_gib <= h200.gpu_memory_gib * sizing.MEMORY_HEADROOM
        assert p.micro_batch * p.grad_accum * p.gpus == p.global_batch
        assert p.ema == (what == "finetune")
        assert p.memory_gib == pytest.approx(p.state_gib + p.activation_gib + sizing.OVERHEAD_GIB[p.zero_stage])
    with pytest.raises(ValueError, match="whole number"):
        sizing.zero_plans(gpu_counts=(12,))
