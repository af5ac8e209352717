"""Reading one split of MDS shards in order, decoded with a model's preprocessing."""

from __future__ import annotations

from typing import Any

from streaming import StreamingDataset

from pipeline.evaluate.preprocessing import Preprocessing


class DecodedShards(StreamingDataset):
    """MDS rows (image bytes, label, key) -> {"image": tensor, "label": int, "key": str, "idx": int}."""

    def __init__(self, pre: Preprocessing, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pre = pre

    def __getitem__(self, idx: int) -> dict:
        row = super().__getitem__(idx)
        return {"image": self.pre.decode(row["image"]), "label": int(row["label"]), "key": str(row.get("key", idx)),
                "idx": int(idx)}
