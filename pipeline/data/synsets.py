"""Class orderings of ImageNet, from the synset lists that timm ships (``timm.data.ImageNetInfo``).

Using timm's lists (rather than sorting the folder names we happen to find) keeps a 21K
model's output index ``i`` meaning the same synset as in timm and every tool that uses its
lists, even for a release that lacks some synsets (winter21 dropped ~2.7K of fall11's).
"""

from __future__ import annotations

import functools

# fall11 (the 21,841-class "ImageNet-21K" release) in the order timm calls imagenet-22k.
IN21K_SUBSET = "imagenet-22k"
IN1K_SUBSET = "imagenet-1k"


@functools.cache
def synsets(subset: str) -> tuple[str, ...]:
    """The synsets of a timm ImageNet subset, in label order (e.g. ``imagenet-22k``, ``imagenet-1k``)."""
    # lazy: timm is slow to import (torchvision, its model registry); only the label lists need it
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo(subset).label_names())


def in21k_synsets() -> tuple[str, ...]:
    return synsets(IN21K_SUBSET)


def in1k_synsets() -> tuple[str, ...]:
    return synsets(IN1K_SUBSET)


@functools.cache
def in1k_to_in21k_indices(in21k_subset: str = IN21K_SUBSET) -> tuple[int, ...]:
    """For each 1K label ``j``, the index of the same synset in the 21K list (length 1000), or -1.

    ``head_1k.weight[j] = head_21k.weight[idx[j]]`` initialises a 1K head from a 21K one, as
    the CoAtNet/ViT papers do when fine-tuning 21K-pretrained models on 1K. -1 marks a 1K
    synset absent from the 21K list: fall11 (timm's ``imagenet-22k``) lacks one, n04399382
    (teddy bear), which Google's list (``imagenet-21k-goog``) has; initialise that row afresh.
    """
    index = {s: i for i, s in enumerate(synsets(in21k_subset))}
    return tuple(index.get(s, -1) for s in in1k_synsets())


def in21k_to_in1k_map(in21k_subset: str = IN21K_SUBSET) -> dict[int, int]:
    """21K label -> 1K label, for the 21K classes that are also 1K classes."""
    return {i21: j for j, i21 in enumerate(in1k_to_in21k_indices(in21k_subset)) if i21 >= 0}


def describe(synset: str) -> str:
    """The WordNet lemma of a synset (e.g. ``n01440764`` -> ``tench, Tinca tinca``)."""
    from timm.data import ImageNetInfo  # lazy, as in synsets()

    return ImageNetInfo(IN1K_SUBSET).label_name_to_description(synset)
