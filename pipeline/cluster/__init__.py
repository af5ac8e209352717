"""Cluster files from one spec: Ray cluster launcher (AWS), KubeRay, shared services, the AWS stack.

``render_all(ClusterSpec(...), out_dir)`` validates the spec (refusing impossible ones with SpecError),
renders every file, checks each against its schema and writes them; ``sizing`` holds the planning estimates
behind the runbook's sizing table.
"""

from pipeline.cluster.render import FILES, render_all
from pipeline.cluster.schemas import ManifestError, validate_manifest, validate_ray_cluster_config
from pipeline.cluster.sizing import Plan, fit, format_table, sizing_table
from pipeline.cluster.spec import ClusterSpec, SpecError, resolve

__all__ = [
    "FILES", "ClusterSpec", "ManifestError", "Plan", "SpecError", "fit", "format_table", "render_all", "resolve",
    "sizing_table", "validate_manifest", "validate_ray_cluster_config",
]
