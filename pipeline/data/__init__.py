"""Dataset sharding: an image source -> mosaicml-streaming (MDS) shards in a directory or on S3.

Public API (contract in docs/architecture.md):

* ``shard_dataset(source, out, ...) -> ShardResult`` (``.uri`` dataset root, ``.manifest``, ``.skipped``)
* ``parse_source(spec) -> Source`` (one class per kind in ``SOURCES``)
* ``load_manifest(uri) -> dict``, ``resolve_root(uri) -> str``, ``format_summary(manifest) -> str``
* ``verify_shards(uri) -> VerifyReport`` (``.ok``, ``.errors``)
* ``digits.write_digits(out_dir, size=32, rotations=None)``; ``digits.parent_map(rotations)``
* ``synsets.in1k_to_in21k_indices()`` / ``synsets.in21k_to_in1k_map()`` (timm's synset lists)
"""

from pipeline.data import digits, synsets
from pipeline.data.config import ShardConfig
from pipeline.data.job import ShardError, ShardResult, shard_dataset
from pipeline.data.manifest import ManifestNotFound, format_summary, load_manifest, resolve_root
from pipeline.data.preprocess import BadInput, preprocess
from pipeline.data.sources import SOURCES, Source, SourceError, parse_source
from pipeline.data.verify import VerifyReport, verify_shards

__all__ = [
    "SOURCES",
    "BadInput",
    "ManifestNotFound",
    "ShardConfig",
    "ShardError",
    "ShardResult",
    "Source",
    "SourceError",
    "VerifyReport",
    "digits",
    "format_summary",
    "load_manifest",
    "parse_source",
    "preprocess",
    "resolve_root",
    "shard_dataset",
    "synsets",
    "verify_shards",
]
