"""MLflow model registry: log, register, gate ``champion``, load back. See ``registry.py``."""

from pipeline.logged_models import load_model, model_metadata
from pipeline.registry.lineage import code_version, lineage_tags
from pipeline.registry.registry import (
    CANDIDATE,
    CHAMPION,
    GateDecision,
    RegisteredModel,
    champion,
    dataset_name,
    gate,
    model_name,
    register,
    register_model,
)
from pipeline.secrets import scrub
from pipeline.tracking import DEFAULT_TRACKING_URI, configure, resolve_tracking_uri

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "DEFAULT_TRACKING_URI",
    "GateDecision",
    "RegisteredModel",
    "champion",
    "code_version",
    "dataset_name",
    "configure",
    "gate",
    "lineage_tags",
    "load_model",
    "model_metadata",
    "model_name",
    "register",
    "register_model",
    "resolve_tracking_uri",
    "scrub",
]
