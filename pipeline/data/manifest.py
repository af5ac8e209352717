"""``manifest.json``: what a dataset root holds, the record later stages and cache keys read.

Keys (see docs/architecture.md): ``format``, ``source``, ``source_fingerprint`` (content),
``listing_fingerprint``, ``config``, ``config_hash``, ``classes``, ``num_classes``, ``classes_hash``,
optional ``parent_classes`` and ``parent_map`` (21K-shaped sources: pretraining label -> fine-tuning
label), ``splits`` (``{split: {samples, bytes, class_counts, parts, shards, index, masked}}``),
``shards`` (every object with size and sha256), ``inputs`` (listed / written / quarantined /
duplicates / masked / bad_fraction; written + quarantined + duplicates = listed), ``quarantined``
(``[{key, path, kind, reason}]``), ``quarantine_counts``, ``columns``, ``code_version``,
``manifest_hash`` and ``run`` (timings; the only part left out of ``manifest_hash``, so the
hash identifies the content, not the run).

Versioned layout: ``shard_dataset(out=X)`` writes the dataset root ``X/cfg-<config hash[:12]>/``
and, once finished, ``X/LATEST`` naming it. A different config never writes into another
config's root. ``resolve_root`` accepts either the root or ``X``. Reading a manifest (``load_manifest``,
typed: ``pipeline.artifacts.read_manifest``) is part of the contract between stages, in ``pipeline.artifacts``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

import numpy as np

from pipeline.artifacts import DATASET_LATEST as LATEST
from pipeline.artifacts import MANIFEST, Manifest, ManifestNotFound, load_manifest, resolve_root

__all__ = ["FORMAT", "LATEST", "MANIFEST", "ManifestNotFound", "canonical_hash", "code_version", "format_summary",
           "is_kept", "load_manifest", "manifest_hash", "masked_indices", "resolve_root"]

FORMAT = "coatnet-shards/1"
_UNHASHED = ("manifest_hash", "run")


def canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_hash(manifest: dict) -> str:
    return canonical_hash({k: v for k, v in manifest.items() if k not in _UNHASHED})


def code_version() -> str:
    try:
        return f"coatnet-pipeline {metadata.version('coatnet-pipeline')}"
    except metadata.PackageNotFoundError:
        return "coatnet-pipeline (not installed)"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def format_summary(manifest: dict) -> str:
    """A human summary table (used by ``coatnet shard`` and ``coatnet shards info``)."""
    lines = [
        f"dataset   {manifest.get('root', '')}",
        f"source    {manifest['source']}  ({manifest['num_classes']} classes)",
        f"config    {manifest['config_hash'][:12]}  max_side={manifest['config']['max_side']} "
        f"jpeg_quality={manifest['config']['jpeg_quality']} seed={manifest['config']['seed']}",
        "",
        f"{'split':<10}{'samples':>10}{'shards':>8}{'bytes':>14}",
    ]
    for name, s in manifest["splits"].items():
        lines.append(f"{name:<10}{s['samples']:>10}{len(s['shards']):>8}{_fmt_bytes(s['bytes']):>14}")
    inputs = manifest["inputs"]
    masked = f" ({inputs['masked']} masked in the shards)" if inputs.get("masked") else ""
    lines += [
        "",
        f"inputs    {inputs['listed']} listed, {inputs['written']} written, {inputs['quarantined']} quarantined "
        f"({inputs['bad_fraction']:.2%}), {inputs.get('duplicates', 0)} duplicates{masked}",
    ]
    for kind, n in sorted(manifest.get("quarantine_counts", {}).items()):
        lines.append(f"  {kind:<18}{n:>8}")
    run = manifest.get("run") or {}
    if run.get("seconds"):
        lines.append(
            f"run       {run['seconds']:.1f} s, {run.get('images_per_s', 0):.0f} images/s, "
            f"{run.get('workers')} workers ({run.get('executor')}), resumed parts: {run.get('resumed_parts', 0)}"
        )
    lines.append(f"manifest  {manifest['manifest_hash'][:16]}")
    return "\n".join(lines)


def masked_indices(manifest: Manifest, split: str) -> np.ndarray:
    """The split's masked sample indices (``splits[split]["masked"]``) as a sorted int64 array: 8 bytes per
    masked sample, not per sample (a few MB at ImageNet-21K's duplicate rate; a bool per sample would be 13 MB
    in every loader worker)."""
    return np.unique(np.asarray(manifest.masked(split), dtype=np.int64))


def is_kept(masked: np.ndarray, idx: np.ndarray | int) -> np.ndarray:
    """For each sample index, whether it is *not* in the sorted array ``masked``."""
    idx = np.asarray(idx, dtype=np.int64)
    if not masked.size:
        return np.ones(idx.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(masked, idx), masked.size - 1)
    return masked[pos] != idx
