"""Sample and class counts of the datasets the paper's recipes train on, for sizing a run before its shards
can be read (a dry run without credentials, or before sharding).

A recipe names one with ``data.num_samples: <name>``; once the shards are readable their own index counts
win. The counts are the releases' published image counts with their source; the sharding stage's train split
is smaller by the minival share it carves out (and by any quarantined files), so a plan built from these is
an estimate to within a few percent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownDataset:
    name: str
    images: int  # training images of the release
    num_classes: int  # rows of the classifier the sharded dataset needs
    source: str  # where ``images`` comes from

    def train_samples(self, minival_fraction: float) -> int:
        """The train split after the sharding stage moves ``minival_fraction`` of it to minival."""
        return round(self.images * (1.0 - minival_fraction))


# The sharding stage labels either ImageNet-21K release over timm's fall11 synset list (21,841 classes,
# ``pipeline.data.synsets.in21k_synsets``), so both releases need a 21,841-row head.
KNOWN_DATASETS: dict[str, KnownDataset] = {d.name: d for d in (
    KnownDataset("imagenet1k", 1_281_167, 1000,
                 "ILSVRC-2012 train set: 1,281,167 images in 1,000 classes (Russakovsky et al., IJCV 2015)"),
    KnownDataset("imagenet21k-fall11", 14_197_122, 21_841,
                 "ImageNet fall 2011 release: 14,197,122 images in 21,841 synsets (image-net.org)"),
    KnownDataset("imagenet21k-winter21", 13_153_500, 21_841,
                 "ImageNet winter 2021 release (winter21_whole): 13,153,500 images in 19,167 synsets "
                 "(image-net.org; Ridnik et al. 2021), labelled over the 21,841 fall11 classes"),
)}
