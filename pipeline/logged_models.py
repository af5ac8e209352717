"""Reading a model logged to MLflow back: the torch module and the metadata logged with it.

Shared by evaluation (which scores ``models:/NAME@ALIAS``) and the registry (which writes these
models), so that neither package imports the other's internals: ``pipeline.registry`` depends on
``pipeline.evaluate``, and both depend on this module.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.tracking import configure


def load_model(uri: str, *, tracking_uri: str | None = None) -> torch.nn.Module:
    """A registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``) as a torch module."""
    import mlflow  # lazy: MLflow is slow to import; pipeline.evaluate imports this for registry URIs only

    configure(tracking_uri)
    return mlflow.pytorch.load_model(uri)


def model_metadata(uri: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The metadata logged with the model (preprocessing, img_size, num_classes, model_config, top1)."""
    import mlflow  # lazy: MLflow is slow to import; pipeline.evaluate imports this for registry URIs only

    configure(tracking_uri)
    return dict(mlflow.models.get_model_info(uri).metadata or {})
