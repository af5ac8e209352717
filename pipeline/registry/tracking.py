"""Where MLflow records go: an explicit URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here.

The registry needs a database backend, so the default is a SQLite file in the working
directory rather than MLflow's own ``./mlruns`` file store.
"""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at ``uri`` and return it."""
    import mlflow

    resolved = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved
