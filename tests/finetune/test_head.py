"""The fine-tuning head starts from the right rows of the pretraining head."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import digits, synsets
from pipeline.finetune import class_children, init_head


def _head(n: int, dim: int = 6) -> dict[str, torch.Tensor]:
    # Row i is filled with i (weight) and 100 + i (bias), so a picked row names itself.
    w = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, dim)
    return {"head.fc.weight": w, "head.fc.bias": 100 + torch.arange(n, dtype=torch.float32), "stem.x": torch.ones(3)}


def test_digits_select_picks_the_upright_rotation_of_each_digit():
    rotations = 4
    src = digits.class_names(rotations)
    children = class_children(src, digits.class_names(), digits.parent_map(rotations), digits.class_names())
    assert children == [[d * rotations + k for k in range(rotations)] for d in range(10)]
    sd, report = init_head(_head(len(src)), children, "select", digits.class_names())
    rows = sd["head.fc.weight"][:, 0].long().tolist()
    assert rows == [d * rotations for d in range(10)]
    assert all(src[r].endswith("_r000") for r in rows)  # the upright class of each digit
    assert sd["head.fc.bias"].tolist() == [100.0 + r for r in rows]
    assert report.unmatched == [] and report.source_classes == 40
    assert torch.equal(sd["stem.x"], torch.ones(3))  # the trunk is untouched


def test_parent_map_is_translated_by_name_when_target_order_differs():
    src = ["a_1", "a_2", "b_1"]
    children = class_children(src, ["b", "a"], parent_map=[0, 0, 1], parent_classes=["a", "b"])
    assert children == [[2], [0, 1]]
    children = class_children(src, ["b", "a"], parent_map={"a_1": "a", "a_2": "a", "b_1": "b"})
    assert children == [[2], [0, 1]]


def test_mean_and_zero_modes():
    children = [[1, 3], [2]]
    sd, _ = init_head(_head(4), children, "mean")
    assert sd["head.fc.weight"][:, 0].tolist() == [2.0, 2.0]
    assert sd["head.fc.bias"].tolist() == [102.0, 102.0]
    sd, report = init_head(_head(4), children, "zero")
    assert sd["head.fc.weight"].abs().sum() == 0 and sd["head.fc.bias"].abs().sum() == 0
    assert report.rows == [[], []]


def test_imagenet_rows_are_the_same_synsets_of_the_21k_list():
    in21k, in1k = list(synsets.in21k_synsets()), list(synsets.in1k_synsets())
    children = class_children(in21k, in1k)
    expected = synsets.in1k_to_in21k_indices()
    assert len(children) == 1000
    for j, rows in enumerate(children):
        assert rows == ([expected[j]] if expected[j] >= 0 else [])
        if rows:
            assert in21k[rows[0]] == in1k[j]
    w = torch.randn(len(in21k), 4)
    sd, report = init_head({"head.fc.weight": w, "head.fc.bias": torch.randn(len(in21k))}, children, "select", in1k)
    j = in1k.index("n01440764")  # tench
    assert torch.equal(sd["head.fc.weight"][j], w[in21k.index("n01440764")])
    # fall11 lacks n04399382 (teddy bear): a zero row, reported.
    missing = [in1k[j] for j, e in enumerate(expected) if e < 0]
    assert report.unmatched == missing
    for name in missing:
        assert sd["head.fc.weight"][in1k.index(name)].abs().sum() == 0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="head init"):
        init_head(_head(4), [[0]], "average")
    with pytest.raises(ValueError, match="outside"):
        init_head(_head(4), [[7]], "select")
    with pytest.raises(ValueError, match="no classifier"):
        init_head({"stem.x": torch.ones(1)}, [[0]], "select")
    with pytest.raises(ValueError, match="parent_map"):
        class_children(["a", "b"], ["x"], parent_map=[0])
