"""Source parsing and scanning: ImageNet-style trees get timm's synset indices; digits splits are honest."""

from __future__ import annotations

import tarfile

import pytest
from shard_helpers import read_split, write_image

from pipeline.data import digits, shard_dataset, synsets
from pipeline.data.config import ShardConfig
from pipeline.data.plan import make_plan
from pipeline.data.sources import SourceError, list_units, parse_source, read_item, scan_unit


def _scan(spec: str) -> tuple[list[dict], object]:
    src = parse_source(spec)
    return [r for u in list_units(src) for r in scan_unit(u, src)], src


def test_imagenet21k_tree_of_folders_and_tars_gets_timm_indices(tmp_path):
    names = synsets.in21k_synsets()
    folder_syn, tar_syn, in1k_syn = names[7], names[12345], "n01440764"
    root = tmp_path / "winter21"
    for i in range(3):
        write_image(root / folder_syn / f"a{i}.JPEG", i)
        write_image(root / in1k_syn / f"c{i}.JPEG", 100 + i)
    tar_src = tmp_path / "staging"
    for i in range(4):
        write_image(tar_src / f"b{i}.JPEG", 50 + i)
    with tarfile.open(root / f"{tar_syn}.tar", "w") as tar:
        for i in range(4):
            tar.add(tar_src / f"b{i}.JPEG", arcname=f"b{i}.JPEG")
    (root / names[99]).mkdir()  # empty class folder
    write_image(root / "n99999999" / "x.JPEG", 999)  # not a WordNet synset of the list

    rows, src = _scan(f"imagenet21k:{root}")
    assert len(src.classes) == 21841 and src.classes[0] == names[0]
    files = {r["key"]: r for r in rows if r["kind"] != "class"}
    assert {r["label"] for r in files.values() if r["synset"] == folder_syn} == {7}
    assert {r["label"] for r in files.values() if r["synset"] == tar_syn} == {12345}
    assert {r["label"] for r in files.values() if r["synset"] == in1k_syn} == {names.index(in1k_syn)}
    tar_rows = [r for r in files.values() if r["kind"] == "tar"]
    assert len(tar_rows) == 4
    # A tar member is read back by offset, byte-identical to the file that went in.
    one = next(r for r in tar_rows if r["key"].endswith("b2.JPEG"))
    assert read_item(one) == (tar_src / "b2.JPEG").read_bytes()
    problems = {r["synset"]: r["error_kind"] for r in rows if r["kind"] == "class"}
    assert problems == {names[99]: "empty_class", "n99999999": "unknown_class"}
    # The 1K synset maps to its 1K label through timm's lists.
    assert synsets.in21k_to_in1k_map()[names.index(in1k_syn)] == synsets.in1k_synsets().index(in1k_syn)

    # End to end: the shards carry the same labels, tar members included.
    res = shard_dataset(f"imagenet21k:{root}", str(tmp_path / "out"), executor="local", minival_fraction=0.0,
                        progress=False)
    m = res.manifest
    assert m["num_classes"] == 21841 and m["classes_hash"] and m["splits"]["train"]["samples"] == 10
    assert {q["kind"] for q in m["quarantined"]} == {"empty_class", "unknown_class"}
    got = {(s["synset"], s["label"]) for s in read_split(res.uri, "train", tmp_path)}
    assert got == {(folder_syn, 7), (tar_syn, 12345), (in1k_syn, names.index(in1k_syn))}
    assert m["splits"]["train"]["class_counts"][12345] == 4


def test_in1k_to_in21k_mapping_from_timm_lists():
    idx = synsets.in1k_to_in21k_indices()
    assert len(idx) == 1000
    in21k, in1k = synsets.in21k_synsets(), synsets.in1k_synsets()
    for j in (0, 1, 500, 999):
        if idx[j] >= 0:
            assert in21k[idx[j]] == in1k[j]
    assert sum(i < 0 for i in idx) == 1  # n04399382 (teddy bear) is missing from fall11


def test_imagenet1k_flat_val_with_loc_labels(tmp_path):
    root = tmp_path / "in1k"
    in1k = synsets.in1k_synsets()
    write_image(root / "train" / in1k[3] / "t0.JPEG", 1)
    write_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", 2)
    write_image(root / "val" / "ILSVRC2012_val_00000002.JPEG", 3)
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000001,{in1k[10]} 1 2 3 4\n"
        f"ILSVRC2012_val_00000002,{in1k[999]} 1 2 3 4 {in1k[999]} 5 6 7 8\n"
    )
    rows, src = _scan(f"imagenet1k:{root}")
    by_key = {r["key"]: r for r in rows}
    assert by_key[f"train/{in1k[3]}/t0.JPEG"]["label"] == 3
    assert by_key["val/ILSVRC2012_val_00000001.JPEG"]["label"] == 10
    assert by_key["val/ILSVRC2012_val_00000002.JPEG"]["label"] == 999
    assert all(r["split"] == "val" for k, r in by_key.items() if k.startswith("val/"))


def test_source_errors_are_immediate_and_say_what_to_fix(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        parse_source(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        parse_source(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(SourceError, match="unknown source"):
        parse_source("cifar:/x")
    with pytest.raises(SourceError, match="rotations"):
        parse_source("digits21k:rotations=9")
    flat = tmp_path / "flat"
    write_image(flat / "train" / synsets.in1k_synsets()[0] / "a.JPEG", 1)
    write_image(flat / "val" / "v.JPEG", 2)
    with pytest.raises(SourceError, match="labels"):
        list_units(parse_source(f"imagenet1k:{flat}"))


def test_digits_label_spaces_share_an_honest_val_split():
    rows10, src10 = _scan("digits")
    rows40, src40 = _scan("digits21k:rotations=4")
    assert len(src10.classes) == 10 and len(src40.classes) == 40
    assert len(rows10) == digits.num_samples() and len(rows40) == 4 * digits.num_samples()
    assert src40.parent_map == tuple(label // 4 for label in range(40))
    for r in rows40[:50]:
        assert src40.parent_map[r["label"]] == int(r["synset"].split("_")[0])

    def sample(r):
        return int(r["key"].rsplit("/", 1)[1])

    plan10 = make_plan(rows10, ShardConfig(src10.spec, seed=1))
    plan40 = make_plan(rows40, ShardConfig(src40.spec, seed=2))  # different seeds on purpose
    split10 = {sample(r): p["split"] for p in plan10.parts for r in p["items"]}
    split40: dict[int, set[str]] = {}
    for p in plan40.parts:
        for r in p["items"]:
            split40.setdefault(sample(r), set()).add(p["split"])
    val10 = {s for s, sp in split10.items() if sp == "val"}
    pretrain_seen = {s for s, sps in split40.items() if sps & {"train", "minival"}}
    assert val10 and not (val10 & pretrain_seen)
    assert all(len(sps) == 1 for sps in split40.values())  # rotations of a sample never straddle splits
    assert val10 == {s for s, sps in split40.items() if sps == {"val"}} == set(digits.val_indices())
    assert {sp for sp in split10.values()} == {"train", "minival", "val"}


def test_write_digits_image_folder_round_trips_through_imagefolder(tmp_path):
    out = digits.write_digits(tmp_path / "dg", size=16)
    rows, src = _scan(f"imagefolder:{out}")
    assert src.classes == tuple(str(d) for d in range(10))
    assert len(rows) == digits.num_samples()
    assert sum(r["split"] == "val" for r in rows) == len(digits.val_indices())
