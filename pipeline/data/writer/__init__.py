"""Writing MDS shards: one part per writer, in its own sub-directory of the split."""

from pipeline.data.writer.shard import COLUMNS, part_dir, part_record_uri, write_part

__all__ = ["COLUMNS", "part_dir", "part_record_uri", "write_part"]
