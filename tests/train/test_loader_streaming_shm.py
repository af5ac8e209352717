"""pipeline.train.streaming_shm against the installed mosaicml-streaming: the private naming and record format
it relies on, and the blocks a live dataset really creates. A streaming release that changes them fails here,
with the name of the internal that moved, before a training run meets it."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from pipeline.train import streaming_shm as shm

SHM_DIR = Path("/dev/shm")  # where POSIX shared memory lives on Linux


def _mds(root: Path) -> str:
    from streaming import MDSWriter

    with MDSWriter(out=str(root), columns={"image": "bytes", "label": "int", "key": "str"}) as w:
        for i in range(8):
            w.write({"image": b"\xff" * 4, "label": i % 2, "key": str(i)})
    return str(root)


def _on_disk(prefix: int) -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{prefix:06}_*")}


def test_the_private_streaming_names_and_format_the_adapter_reads():
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _pack_locals, _unpack_locals

    assert _get_path(7, LOCALS) == "000007_locals", "streaming renamed its shared-memory blocks"
    assert _unpack_locals(_pack_locals(["/a", "/b"], 7)) == (["/a", "/b"], 7), "streaming's locals record changed"
    assert LOCALS in SHM_TO_CLEAN
    assert shm.block_names(7) == [f"000007_{n}" for n in SHM_TO_CLEAN]


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory is listed under /dev/shm on Linux only")
def test_a_dataset_is_found_by_its_directory_and_released_after_deletion(tmp_path):
    from streaming import StreamingDataset

    local, other = _mds(tmp_path / "mine"), _mds(tmp_path / "theirs")
    ds, theirs = StreamingDataset(local=local, batch_size=2), StreamingDataset(local=other, batch_size=2)
    prefix, their_prefix = shm.dataset_prefix(ds), shm.dataset_prefix(theirs)
    try:
        assert sum(1 for _ in ds) == 8
        assert shm.registered_locals(prefix) == [local]
        assert shm.registered_prefixes([local]) == [prefix]
        # Every block streaming created for the dataset is one the adapter knows to unlink.
        created = _on_disk(prefix)
        assert f"{prefix:06}_locals" in created and created <= set(shm.block_names(prefix)), created
        assert not shm.release_deleted_dataset(prefix)  # live: left alone
        assert _on_disk(prefix) == created
        del ds
        gc.collect()
        assert shm.registered_locals(prefix) == []  # deletion unregisters the directory, leaves the blocks
        assert _on_disk(prefix) == created
        assert shm.release_deleted_dataset(prefix)
        assert _on_disk(prefix) == set()
        assert shm.registered_locals(prefix) is None
        # Another job's dataset on the node is untouched, and the directory can be used again.
        assert shm.registered_prefixes([other]) == [their_prefix] and _on_disk(their_prefix)
        again = StreamingDataset(local=local, batch_size=2)
        assert shm.registered_prefixes([local]) == [shm.dataset_prefix(again)]
        assert shm.release_stale_shared_memory([local]) == 1
        assert shm.registered_prefixes([local]) == [] and shm.registered_prefixes([other]) == [their_prefix]
        del again
    finally:
        del theirs
        gc.collect()
        for p in (prefix, their_prefix):
            shm.release_deleted_dataset(p)
