"""Streaming's shared memory, found and released by local directory: the one module that knows its internals.

mosaicml-streaming 0.13 names every shared-memory block of a dataset ``{prefix:06}_{name}`` (``name`` from
``SHM_TO_CLEAN``) and records, in the prefix's ``locals`` block, which local directories registered it. Its
public API offers no lookup of a directory's prefix and no targeted release: only
``streaming.base.util.clean_stale_shared_memory()``, which unlinks every job's memory on the node (other
trainings and evaluations beside this one included). So this module reads streaming's private naming
(``_get_path``), record format (``_unpack_locals``) and the dataset's ``_shm_prefix_int``; nothing else in the
project does. ``tests/train/test_loader_streaming_shm.py`` checks those internals against the installed
streaming and fails when a release changes them; the import below fails with a message naming this module.
Unlinking goes through the standard library's ``multiprocessing.shared_memory``.
"""

from __future__ import annotations

from multiprocessing.shared_memory import SharedMemory as _StdSharedMemory
from typing import Any

try:
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _unpack_locals
except ImportError as e:  # pragma: no cover - only with a streaming whose internals moved
    raise ImportError(
        f"pipeline.train.streaming_shm was written against mosaicml-streaming 0.13's shared-memory internals, "
        f"which the installed streaming no longer has ({e}); adapt this module "
        f"(tests/train/test_loader_streaming_shm.py shows what it relies on)"
    ) from e

# Prefixes are allocated upwards from 0 but leave gaps (a crashed job's file locks block its prefix for
# good): a run of this many absent prefixes means the end.
_MAX_GAP = 4096


def block_names(prefix: int) -> list[str]:
    """The names of every shared-memory block streaming may create for ``prefix``."""
    return [_get_path(prefix, name) for name in SHM_TO_CLEAN]


def dataset_prefix(dataset: Any) -> int:
    """The shared-memory prefix of a live ``StreamingDataset``."""
    return int(dataset._shm_prefix_int)


def registered_locals(prefix: int) -> list[str] | None:
    """The local directories registered under ``prefix`` (empty once its dataset was deleted); None when the
    prefix has no ``locals`` block. Raises PermissionError for another user's block."""
    try:
        shm = SharedMemory(_get_path(prefix, LOCALS), create=False, auto_cleanup=False)
    except FileNotFoundError:
        return None
    try:
        dirs, _ = _unpack_locals(bytes(shm.buf))
    finally:
        shm.cleanup()
    return list(dirs)


def registered_prefixes(dirs: list[str]) -> list[int]:
    """Streaming's shared-memory prefixes whose registered local directories include any of ``dirs``."""
    mine, found, misses, prefix = set(dirs), [], 0, -1
    while misses < _MAX_GAP:
        prefix += 1
        try:
            theirs = registered_locals(prefix)
        except PermissionError:
            continue
        if theirs is None:
            misses += 1
            continue
        misses = 0
        if mine & set(theirs):
            found.append(prefix)
    return found


def unlink_prefix(prefix: int) -> None:
    """Unlink every shared-memory block of ``prefix`` (the memory goes once its last user unmaps it)."""
    for name in block_names(prefix):
        try:
            shm = _StdSharedMemory(name)
        except FileNotFoundError:
            continue
        shm.close()
        shm.unlink()  # also drops the resource tracker's registration that attaching made


def release_stale_shared_memory(dirs: list[str]) -> int:
    """Unlink streaming's shared memory registered for these local directories; returns how many sets.

    Called on each node before a run creates its datasets: any registration of its own (run-unique)
    directories then belongs to a killed earlier process of the same run, and can make streaming
    refuse them ("Reused local directory"). Unlike streaming's clean_stale_shared_memory(), this
    leaves other jobs on the node alone.
    """
    prefixes = registered_prefixes(dirs)
    for prefix in prefixes:
        unlink_prefix(prefix)
    return len(prefixes)


def release_deleted_dataset(prefix: int) -> bool:
    """Unlink the shared memory of a deleted ``StreamingDataset`` of this process; True when released.

    streaming 0.13 unregisters a deleted dataset's local directories but leaves its blocks (and so its
    prefix) behind until reboot, which piles up in a process that builds many datasets (benchmarks).
    A prefix that still registers a directory (a live dataset) is left alone.
    """
    if registered_locals(prefix):
        return False
    unlink_prefix(prefix)
    return True
