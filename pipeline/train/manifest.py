"""A checkpoint's integrity record: ``manifest.json``, the size and a hash of every file of a step directory,
written by rank 0 after the completion marker, so that a copy cut short (a full disk, a half-finished
transfer) is told from a complete one before DeepSpeed is asked to unpickle it.

Files up to ``HASH_LIMIT`` (RNG states, client state, EMA metadata, every file of a small model) get a
BLAKE2b hash checked on resume; larger ones are checked by size on resume (a hash of every byte of a
multi-GiB state on every restart is a cost the operator chooses with ``verify(..., hash_all=True)``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
HASH_LIMIT = 64 << 20
_SKIP = {MANIFEST, "complete.json"}


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    # universal/ is a cache derived on demand; dot-files are temporaries.
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in _SKIP
                  and not any(part.startswith(".") or part == "universal"
                              for part in p.relative_to(step_dir).parts))


def write(step_dir: Path) -> dict:
    """Record every file of ``step_dir``: size always, hash for all (written once, read on every resume)."""
    entries = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "blake2b": _digest(p)}
               for p in _files(step_dir)}
    record = {"files": entries}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(step_dir / MANIFEST)
    return record


def problem(step_dir: Path, *, hash_all: bool = False) -> str | None:
    """What is wrong with ``step_dir`` against its manifest (one phrase naming the file), or None when intact.

    A checkpoint without a manifest (written before manifests existed) is not judged: None.
    """
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        f = step_dir / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, the manifest says {want['size']}"
        if (hash_all or size <= HASH_LIMIT) and _digest(f) != want["blake2b"]:
            return f"{name} does not match its hash in the manifest"
    return None
