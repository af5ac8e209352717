"""Where MLflow records go: an explicit URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here.

The registry needs a database backend, so the default is a SQLite file in the working
directory rather than MLflow's own ``./mlruns`` file store.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at ``uri`` and return it."""
    import mlflow  # lazy: MLflow is slow to import; resolving a URI or scrubbing never needs it

    resolved = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


def run_kwargs(run_id: str | None, experiment: str, run_name: str) -> dict[str, Any]:
    """``mlflow.start_run`` arguments that continue ``run_id`` when this server has it, else open a new run.

    A later stage (evaluation, registration) logs into the training run so one run holds the whole story;
    a run id from another server (a copied run directory) falls back to a new run with a warning.
    """
    # lazy, as in configure
    import mlflow
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            existing = mlflow.MlflowClient().get_run(run_id)
            # fluent start_run refuses a run outside the active experiment (set by an earlier call).
            mlflow.set_experiment(experiment_id=existing.info.experiment_id)
            return {"run_id": run_id}
        except MlflowException:
            log.warning("run %s is not on this tracking server; logging to a new run", run_id)
    mlflow.set_experiment(experiment)
    return {"run_name": run_name}
