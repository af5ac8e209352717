"""The I/O tasks' retry policy: failures a retry can fix are retried with back-off, user errors are not."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from flows import tasks
from pipeline.data import ShardError, SourceError
from pipeline.storage import StorageError


@pytest.mark.parametrize("exc, retried", [
    (ConnectionError("connection reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (RuntimeError("ray worker died"), True),
    (SourceError("unknown source 'digitz'"), False),
    (ShardError("unfinished run over different source contents"), False),
    (StorageError("cannot write to s3://nope"), False),
    (tasks.CachedShardsInvalid("sha256 mismatch"), False),
])
def test_only_transient_failures_are_retried(exc, retried):
    assert tasks.transient(tasks.shard, None, Failed(data=exc)) is retried


def test_io_tasks_retry_with_backoff_and_training_never_retries():
    for t in (tasks.shard, tasks.register):
        assert t.retries >= 1 and t.retry_condition_fn is tasks.transient
        delays = t.retry_delay_seconds
        assert len(delays) == t.retries and all(b > a for a, b in zip(delays, delays[1:]))  # exponential
    for t in (tasks.pretrain, tasks.finetune):
        assert t.retries == 0
