"""Lineage recorded on every registered version: where the data, the weights and the code came from."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

LINEAGE_KEYS = ("manifest_hash", "pretrain_run_id", "finetune_run_id", "code_version")


@functools.cache
def code_version() -> str:
    """``git:<sha>[-dirty]`` when run from a checkout, else the installed package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return f"git:{sha[:12]}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"pkg:{metadata.version('coatnet-pipeline')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def lineage_tags(**values: str | None) -> dict[str, str]:
    """``lineage.<key>`` tags; unknown keys are rejected so a typo cannot silently drop lineage."""
    unknown = set(values) - set(LINEAGE_KEYS)
    if unknown:
        raise ValueError(f"unknown lineage keys {sorted(unknown)}; expected {list(LINEAGE_KEYS)}")
    values.setdefault("code_version", code_version())
    return {f"lineage.{k}": str(v) for k, v in values.items() if v not in (None, "")}
