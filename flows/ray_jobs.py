"""Run a pipeline command on a Ray cluster through Ray Jobs and follow it to the end.

The flow's training task uses this in cluster mode: it submits the same `coatnet` CLI command a user would
type (so cluster and local runs never diverge), streams the job's log lines into the Prefect log as they
come, and fails the task when the job fails. A job is tagged with the pipeline run and stage in its
metadata, so a retried or restarted flow run re-attaches to a job that is still running instead of
starting a second one that would write to the same checkpoint directory.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Never upload these with the working directory: the virtual environment and local outputs are large and
# machine-specific; the cluster image brings its own environment.
DEFAULT_EXCLUDES = [
    ".venv", ".git", "demo-output", "mlruns", "mlartifacts", "mlflow.db", "runs", "*.safetensors", "*.pt",
    "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".ray_tmp", "benchmarks/results",
]


class RayJobError(RuntimeError):
    """The Ray job ended in a state other than SUCCEEDED."""


@dataclass(frozen=True)
class RayJobSpec:
    address: str
    entrypoint: Sequence[str]
    metadata: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = "."
    env_vars: dict[str, str] = field(default_factory=dict)
    pip: Sequence[str] = ()
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    excludes: Sequence[str] = tuple(DEFAULT_EXCLUDES)

    def runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {}
        if self.working_dir:
            env["working_dir"] = self.working_dir
            env["excludes"] = list(self.excludes)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        if self.pip:
            env["pip"] = list(self.pip)
        return env


@dataclass(frozen=True)
class RayJobOutcome:
    job_id: str
    status: str
    attached: bool  # True when an already running job was followed instead of a new submission
    seconds: float


def _client(address: str):
    # lazy: Ray takes seconds to import; only training.mode ray-job submits jobs
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def find_active_job(client, metadata: dict[str, str]) -> str | None:
    """The id of a PENDING/RUNNING job whose metadata contains all of ``metadata``, if any."""
    if not metadata:
        return None
    for job in client.list_jobs():
        status = str(getattr(job.status, "value", job.status))
        if status in ("PENDING", "RUNNING") and all(
            (job.metadata or {}).get(k) == v for k, v in metadata.items()
        ):
            return job.submission_id
    return None


async def _tail(client, job_id: str, emit: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            emit(line)


def _submit(client, spec: RayJobSpec, emit: Callable[[str], None], *, wait_agent_s: float = 300.0) -> str:
    """Submit, waiting while the head reports no job agent yet (a cluster that is still starting)."""
    deadline = time.monotonic() + wait_agent_s
    delay = 1.0
    while True:
        try:
            return client.submit_job(
                entrypoint=shlex.join(spec.entrypoint),
                runtime_env=spec.runtime_env() or None,
                metadata=dict(spec.metadata) or None,
                entrypoint_num_cpus=spec.entrypoint_num_cpus,
                entrypoint_num_gpus=spec.entrypoint_num_gpus,
            )
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            emit(f"[ray-job] no job agent on {spec.address} yet; retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def run_ray_job(
    spec: RayJobSpec,
    *,
    log: logging.Logger | logging.LoggerAdapter | Callable[[str], None] | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> RayJobOutcome:
    """Submit ``spec`` (or attach to the same job still running), stream its logs, and wait for the end.

    Raises ``RayJobError`` with the tail of the job's log when the job fails or is stopped.
    """
    emit = log.info if isinstance(log, logging.Logger | logging.LoggerAdapter) else (log or print)
    client = _client(spec.address)
    t0 = time.monotonic()
    job_id = find_active_job(client, spec.metadata)
    attached = job_id is not None
    if attached:
        emit(f"[ray-job] attaching to running job {job_id} on {spec.address}")
    else:
        job_id = _submit(client, spec, emit)
        emit(f"[ray-job] submitted {job_id} to {spec.address}: {shlex.join(spec.entrypoint)}")
    try:
        # tail_job_logs ends when the job reaches a terminal state; streaming keeps the Prefect log live.
        asyncio.run(asyncio.wait_for(_tail(client, job_id, lambda s: emit(f"[{job_id}] {s}")), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
        raise RayJobError(f"Ray job {job_id} did not finish within {timeout_s} s; stopped it") from None
    except Exception as e:  # noqa: BLE001 - a dropped log stream must not lose the job: fall back to polling
        emit(f"[ray-job] log stream interrupted ({type(e).__name__}: {e}); polling status")
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            break
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            client.stop_job(job_id)
            raise RayJobError(f"Ray job {job_id} did not finish within {timeout_s} s; stopped it")
        time.sleep(poll_s)
    name = str(getattr(status, "value", status))
    if name != "SUCCEEDED":
        info = client.get_job_info(job_id)
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-30:])
        raise RayJobError(f"Ray job {job_id} ended {name}: {info.message or ''}\n--- last log lines ---\n{tail}")
    return RayJobOutcome(job_id=job_id, status=name, attached=attached, seconds=time.monotonic() - t0)
