"""`coatnet models`: the table of every variant beside the paper's figures."""

from __future__ import annotations

import json

import pytest

import coatnet
from pipeline.cli import main


def test_models_table_lists_every_variant_with_paper_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("coatnet_") and ":" not in line.split()[0]}
    assert set(lines) == set(coatnet.list_models())
    assert "GMACs@224" in out and "GMACs@512" in out and "paper@384" in out
    assert "25.0M" in lines["coatnet_0"] and "4.2" in lines["coatnet_0"] and "13.4" in lines["coatnet_0"]
    assert "2.44B" in lines["coatnet_7"] and "2586.0" in lines["coatnet_7"]
    assert "1.47B" in out  # coatnet_6's inconsistency is stated


def test_models_json_matches_the_counter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json", "--num-classes", "10"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    params, macs = coatnet.count("coatnet_2", 384, num_classes=10)
    assert rows["coatnet_2"]["gmacs"]["384"] == pytest.approx(macs / 1e9)
    assert rows["coatnet_2"]["params"] == coatnet.count("coatnet_2", 224, num_classes=10)[0]
    assert rows["coatnet_3"]["paper_gmacs"]["512"] == 203.1
