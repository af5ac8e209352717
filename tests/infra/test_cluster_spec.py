"""Impossible specs are refused with a message that says what to change, and nothing is written."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.cluster import ClusterSpec, SpecError, render_all


@pytest.mark.parametrize("kwargs, message", [
    (dict(nodes=3, gpus_per_node=8, global_batch=4096), r"global batch 4096 is not divisible by the world size 24"),
    (dict(nodes=2, gpus_per_node=8, micro_batch=48), r"micro-batch 48 x world size 16 = 768.*try global batch 3840 or 4608"),
    (dict(nodes=2, gpus_per_node=16), r"gpus-per-node 16 is more than p5.48xlarge has \(8 x H100\)"),
    (dict(nodes=2, gpus_per_node=8, model="coatnet_9"), r"unknown model 'coatnet_9'"),
    (dict(nodes=2, gpus_per_node=8, instance_type="p9.huge"), r"unknown GPU instance type 'p9.huge'"),
    (dict(nodes=2, gpus_per_node=8, instance_type="p4d.24xlarge", zero_stage=0),
     r"does not fit one A100 \(40 GiB\)"),
    (dict(nodes=1, gpus_per_node=8, micro_batch=512, zero_stage=2), r"needs about \d+ GiB per GPU"),
    (dict(nodes=2, gpus_per_node=8, bucket="Not_A_Bucket"), r"not a valid S3 bucket name"),
    (dict(nodes=2, gpus_per_node=8, config="configs/pretrain/nope.yaml"), r"'configs/pretrain/nope.yaml' not found"),
])
def test_impossible_specs_are_refused(tmp_path, kwargs, message):
    spec = ClusterSpec(**{"model": "coatnet_7", **kwargs})
    with pytest.raises(SpecError, match=message):
        render_all(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_the_refusal_and_exits_nonzero(tmp_path, capsys):
    rc = main(["cluster", "render", "--nodes", "2", "--gpus-per-node", "8", "--model", "coatnet_7",
               "--global-batch", "4000", "--micro-batch", "32", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "global batch 4000 is not divisible by micro-batch 32 x world size 16" in err
    assert not (tmp_path / "out").exists()


def test_cli_renders_a_spec_and_fills_the_open_choices(tmp_path, capsys):
    rc = main(["cluster", "render", "--nodes", "4", "--gpus-per-node", "8", "--model", "coatnet_7",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "world size 32" in out and "global batch 4096" in out
    for name in ("ray/cluster.yaml", "kubernetes/raycluster.yaml", "kubernetes/rayjob.yaml",
                 "kubernetes/services.yaml", "aws/bucket-stack.yaml", "spec.json"):
        assert (tmp_path / "out" / name).is_file()
