"""Where images come from: one class per source kind, in a registry (``SOURCES``), parsed from a spec.

Specs (``coatnet shard --source ...``): ``imagefolder:ROOT``, ``imagenet21k:ROOT``, ``imagenet1k:ROOT``
(``ROOT`` a path or ``s3://bucket/prefix``; see ``tree``), ``digits[:size=32]``,
``digits21k[:rotations=4,size=32]`` (see ``digits``), and ``synthetic:n=N,classes=C`` (benchmarks and
tests, see ``synthetic``). A new kind is a ``Source`` subclass decorated with ``@register``.
"""

from pipeline.data.sources import digits, synthetic, tree  # noqa: F401 - importing registers the kinds
from pipeline.data.sources.base import (
    RANGE_ITEMS,
    SOURCES,
    Item,
    Source,
    SourceError,
    Unit,
    UnitProblem,
    parse_source,
    register,
)
from pipeline.data.sources.tree import SourceChanged

__all__ = ["RANGE_ITEMS", "SOURCES", "Item", "Source", "SourceChanged", "SourceError", "Unit", "UnitProblem",
           "parse_source", "register"]
