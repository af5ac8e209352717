"""The markdown summary every pretrain-coatnet run leaves as a Prefect artifact (and the demo prints)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def artifact_key(run_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"coatnet-{run_name}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", key)[:100]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: Mapping[str, Any]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in rows.items() if v is not None]
    return out


def mlflow_run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    if not run_id:
        return None
    if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
        return f"[{run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`" + (f" (tracking store `{tracking_uri}`)" if tracking_uri else "")


def render(summary: Mapping[str, Any]) -> str:
    """``summary`` is the dict the pretrain-coatnet flow returns; every section is optional."""
    lines = [f"# pretrain-coatnet run `{summary.get('run_name')}`", ""]
    for ds in summary.get("datasets", []):
        lines += [f"## Dataset `{ds.get('source')}`", ""]
        lines += _table(
            {
                "location": f"`{ds.get('uri')}`",
                "classes": ds.get("num_classes"),
                **{f"{split} samples": n for split, n in (ds.get("samples") or {}).items()},
                "manifest hash": ds.get("manifest_hash"),
                "cache": ("reused existing shards" + (" (verified against the manifest)" if ds.get("verified") else ""))
                if ds.get("skipped") else "sharded in this run",
            }
        )
        lines.append("")
    for stage in ("pretrain", "finetune"):
        tr = summary.get(stage)
        if not tr:
            continue
        lines += [f"## {stage.capitalize()}", ""]
        rows: dict[str, Any] = {
            "output": f"`{tr.get('output_dir')}`",
            "resumed from step": tr.get("resumed_from_step"),
            "mode": tr.get("mode"),
        }
        rows.update({k: v for k, v in (tr.get("metrics") or {}).items()})
        rows["MLflow run"] = mlflow_run_link(
            summary.get("mlflow_tracking_uri"), tr.get("mlflow_experiment_id"), tr.get("mlflow_run_id")
        )
        lines += _table(rows)
        lines.append("")
    ev = summary.get("evaluation")
    if ev:
        lines += ["## Evaluation", ""]
        lines += _table({k: v for k, v in ev.items() if isinstance(v, int | float | str)})
        lines.append("")
    reg = summary.get("registered")
    if reg:
        lines += ["## Registered model", ""]
        lines += _table(
            {
                "name": f"`{reg.get('name')}`",
                "version": reg.get("version"),
                "aliases": ", ".join(reg.get("aliases") or []),
                "load with": f"`models:/{reg.get('name')}/{reg.get('version')}`",
                "MLflow tracking store": f"`{summary.get('mlflow_tracking_uri')}`",
            }
        )
        lines.append("")
    return "\n".join(lines)
