"""Where the tasks of a sharding job run: Ray tasks on a cluster, or a plain loop in this process.

Both executors offer one operation, ``map(fn, items, *shared)``: call ``fn(item, *shared)`` for every
item and yield ``(position, result)`` as results come in. ``shared`` values (the source, the config,
the val hashes) go to Ray's object store once (``put``), not once per task.

``RayExecutor`` starts a small local Ray when no address is given (and shuts down only what it
started), or joins ``ray_address`` / ``RAY_ADDRESS`` (``ray://...`` for a remote cluster, whose nodes
need this package and S3 credentials of their own). Plain tasks with the driver holding a bounded
window of them in flight, rather than a Ray Data pipeline: a task is a whole part (seconds to a
minute of work) with a small result, so there is nothing to stream between operators, and the window
keeps exactly ``workers`` CPUs busy without the executor's own threads competing for them. Ray
retries a task whose worker or node died (``max_retries``); a task's own user error (``UserError``)
is re-raised as itself, so the command line prints its one line.

``LocalExecutor`` runs the very same functions in a loop: the single-process baseline of the
benchmarks, and the fast path of tests that do not need a Ray start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline import storage
from pipeline.errors import UserError

OBJECT_STORE_BYTES = 256 * 1024 * 1024
TASK_RETRIES = 3  # a lost worker or node: the task runs again elsewhere (parts are idempotent)


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self.workers = 1

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def put(self, obj: Any) -> Any:
        return obj

    def defer(self, fn: Callable, *args: Any) -> Any:
        return fn(*args)

    def map(self, fn: Callable, items: Iterable, *shared: Any) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            yield i, fn(item, *shared)


def _call(fn: Callable, item: Any, endpoint: str | None, *shared: Any) -> Any:
    if endpoint and os.environ.get("S3_ENDPOINT_URL") != endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint
        storage.reset_clients()
    return fn(item, *shared)


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.requested = workers
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.started = False
        self.workers = workers or 1
        self.cluster_cpus = 1

    def __enter__(self) -> RayExecutor:
        import ray  # lazy: the local executor (tests, benchmarks' baseline) never pays for importing Ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=self.requested or os.cpu_count() or 1, include_dashboard=False,
                         object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING)
            self.started = True
        self.cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.workers = max(1, min(self.requested or self.cluster_cpus, self.cluster_cpus))
        self._remote = ray.remote(_call).options(num_cpus=1, max_retries=TASK_RETRIES)
        return self

    def __exit__(self, *exc) -> None:
        import ray  # lazy, as in __enter__

        if self.started:
            ray.shutdown()

    def put(self, obj: Any) -> Any:
        import ray  # lazy, as in __enter__

        return ray.put(obj)

    def defer(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` run as a task; its result stays in the object store (a reference for later tasks)."""
        return self._remote.remote(fn, args[0], storage.endpoint_url(), *args[1:])

    def map(self, fn: Callable, items: Iterable, *shared: Any) -> Iterator[tuple[int, Any]]:
        # lazy, as in __enter__
        import ray
        from ray.exceptions import RayTaskError

        # Exactly ``workers`` in flight caps the job at that many CPUs of a bigger cluster; when it may use
        # the whole cluster, a second task per CPU hides the gap between one task's end and the next start.
        window = self.workers * (2 if self.workers >= self.cluster_cpus else 1)
        endpoint = storage.endpoint_url()
        pending: dict[Any, int] = {}
        queue = iter(enumerate(items))
        try:
            while True:
                while len(pending) < window:
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    pending[self._remote.remote(fn, nxt[1], endpoint, *shared)] = nxt[0]
                if not pending:
                    return
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        yield i, ray.get(ref)
                    except RayTaskError as e:
                        if isinstance(e.cause, UserError):
                            raise e.cause from None
                        raise
        finally:
            for ref in pending:  # an error or an interrupt: stop the work in flight, keep what is done
                ray.cancel(ref, force=True)
