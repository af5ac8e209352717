"""Sources: parsing, listing and reading; ImageNet-style trees get timm's synset indices; digits splits are honest."""

from __future__ import annotations

import tarfile

import pytest
from shard_helpers import read_split, write_image

from pipeline import storage
from pipeline.data import digits, shard_dataset, synsets
from pipeline.data.config import ShardConfig
from pipeline.data.plan import make_plan
from pipeline.data.sources import SOURCES, Item, SourceError, UnitProblem, parse_source
from pipeline.data.writer.shard import Sample, _assign


def _read(spec: str):
    """Every item and unit problem of a source, as the writers would read them; and the source."""
    src = parse_source(spec)
    units = [src.describe(u) for u in src.list_units()]
    plan = make_plan(units, src, ShardConfig(src.spec))
    out = [x for p in plan.parts for u in p.units for x in src.read(u)]
    items = [x for x in out if isinstance(x, Item)]
    problems = [x for x in out if isinstance(x, UnitProblem)] + [UnitProblem(**q) for q in plan.problems]
    return items, problems, src


def test_every_source_kind_is_a_registered_class():
    assert set(SOURCES) == {"imagefolder", "imagenet21k", "imagenet1k", "digits", "digits21k", "synthetic"}
    src = parse_source("synthetic:n=10,classes=3,dup_every=4")
    assert type(src) is SOURCES["synthetic"] and src.spec == "synthetic:n=10,classes=3,size=8,dup_every=4"
    items = sorted((x for u in src.list_units() for x in src.read(u)), key=lambda i: i.key)
    assert len(items) == 10 and len({i.data for i in items}) == 8  # images 3 and 7 repeat 2 and 6


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

    items, problems, src = _read(f"imagenet21k:{root}")
    assert len(src.classes) == 21841 and src.classes[0] == names[0]
    files = {i.key: i for i in items}
    assert {i.label for i in files.values() if i.synset == folder_syn} == {7}
    assert {i.label for i in files.values() if i.synset == tar_syn} == {12345}
    assert {i.label for i in files.values() if i.synset == in1k_syn} == {names.index(in1k_syn)}
    tar_items = [i for i in files.values() if i.path.endswith(".tar")]
    assert len(tar_items) == 4
    # A tar member is read from the stream byte-identical to the file that went in.
    one = next(i for i in tar_items if i.key.endswith("b2.JPEG"))
    assert one.data == (tar_src / "b2.JPEG").read_bytes()
    assert {p.key.split("/")[1]: p.kind for p in problems} == {names[99]: "empty_class", "n99999999": "unknown_class"}
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
    items, _, src = _read(f"imagenet1k:{root}")
    by_key = {i.key: i for i in items}
    assert by_key[f"train/{in1k[3]}/t0.JPEG"].label == 3
    assert by_key["val/ILSVRC2012_val_00000001.JPEG"].label == 10
    assert by_key["val/ILSVRC2012_val_00000002.JPEG"].label == 999
    assert len(by_key) == 3


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
        parse_source(f"imagenet1k:{flat}").list_units()
    with pytest.raises(SourceError, match="needs n= and classes="):
        parse_source("synthetic:n=10")


def test_digits_label_spaces_share_an_honest_val_split():
    items10, _, src10 = _read("digits")
    items40, _, src40 = _read("digits21k:rotations=4")
    assert len(src10.classes) == 10 and len(src40.classes) == 40
    assert len(items10) == digits.num_samples() and len(items40) == 4 * digits.num_samples()
    assert src40.parent_map == tuple(label // 4 for label in range(40))
    for i in items40[:50]:
        assert src40.parent_map[i.label] == int(i.synset.split("_")[0])

    def sample(key: str) -> int:
        return int(key.rsplit("/", 1)[1])

    def splits(items, src, seed: int) -> dict[int, set[str]]:
        # What the writers do with a unit (a digit of a split): minival is a seeded share of its groups.
        by_unit: dict[str, list] = {}
        for i in items:
            digit = i.label if src.parent_map is None else src.parent_map[i.label]
            by_unit.setdefault(f"{i.key.split('/')[0]}/{digit}", []).append(i)
        out: dict[int, set[str]] = {}
        for unit, its in by_unit.items():
            samples = [Sample(i.key, i.label, i.synset, i.path, i.group, unit, b"", 0, 0, False, 0) for i in its]
            for split, chosen in _assign(samples, "val" if unit.startswith("val") else "train",
                                         {"minival_fraction": 0.02, "seed": seed}).items():
                for s in chosen:
                    out.setdefault(sample(s.key), set()).add(split)
        return out

    split10, split40 = splits(items10, src10, seed=1), splits(items40, src40, seed=2)  # different seeds on purpose
    val10 = {s for s, sp in split10.items() if sp == {"val"}}
    pretrain_seen = {s for s, sps in split40.items() if sps & {"train", "minival"}}
    assert val10 and not (val10 & pretrain_seen)
    assert all(len(sps) == 1 for sps in split40.values())  # rotations of a sample never straddle splits
    assert val10 == {s for s, sps in split40.items() if sps == {"val"}} == set(digits.val_indices())
    assert set().union(*split10.values()) == {"train", "minival", "val"}


def test_write_digits_image_folder_round_trips_through_imagefolder(tmp_path):
    out = digits.write_digits(tmp_path / "dg", size=16)
    items, _, src = _read(f"imagefolder:{out}")
    assert src.classes == tuple(str(d) for d in range(10))
    assert len(items) == digits.num_samples()
    assert sum(i.key.startswith("val/") for i in items) == len(digits.val_indices())


def test_a_bucket_listing_reads_every_page(in21k_bucket):
    root = in21k_bucket["source"].split(":", 1)[1]
    whole = storage.list_dir(root)
    assert len(whole.files) == 17 and len(whole.dirs) == 1  # 16 tars + the unknown synset's; one synset folder
    bucket, prefix = storage.split_s3(root)
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/", Delimiter="/", PaginationConfig={"PageSize": 3})
    assert len(list(pages)) == 6  # the server really pages
    assert storage.list_dir(root, page_size=3) == whole
