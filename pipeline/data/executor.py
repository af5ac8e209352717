"""Where the scan and the writers run: a Ray cluster (Ray Data), or the current process.

``RayExecutor`` starts a small local Ray when no address is given (and shuts down only what it
started), or joins ``ray_address`` / ``RAY_ADDRESS`` (``ray://...`` for a remote cluster, whose
nodes must have this package installed). ``LocalExecutor`` runs the very same functions in a
plain loop: the single-process baseline of the benchmark, and a fast path for tests that need
a few shards without paying for a Ray start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

from pipeline.data.sources import Source, scan_unit
from pipeline.data.writer import write_part

OBJECT_STORE_BYTES = 256 * 1024 * 1024


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self.workers = 1

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def scan(self, units: list[dict], source: Source) -> Iterator[dict]:
        for unit in units:
            yield from scan_unit(unit, source)

    def write(self, tasks: list[dict]) -> Iterator[dict]:
        for task in tasks:
            yield write_part(task)


def _scan_row(unit: dict, source: Source) -> list[dict]:
    return [{"row": json.dumps(r)} for r in scan_unit(unit, source)]


def _write_batch(batch: dict) -> dict:
    import numpy as np

    records = [json.dumps(write_part(json.loads(t))) for t in batch["task"]]
    return {"record": np.array(records, dtype=object)}


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.requested = workers
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.started = False
        self.workers = workers or 1

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING)
            else:
                ray.init(
                    num_cpus=self.requested or os.cpu_count() or 1,
                    include_dashboard=False,
                    object_store_memory=OBJECT_STORE_BYTES,
                    logging_level=logging.WARNING,
                )
            self.started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, min(self.requested or cpus, cpus))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own bar counts images, not blocks
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.started:
            ray.shutdown()

    def scan(self, units: list[dict], source: Source) -> Iterator[dict]:
        import ray

        ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 8 * self.workers)))
        ds = ds.flat_map(_scan_row, fn_kwargs={"source": source}, num_cpus=1)
        for row in ds.iter_rows():
            yield json.loads(row["row"])

    def write(self, tasks: list[dict]) -> Iterator[dict]:
        import ray

        if not tasks:
            return
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        # Tasks on Ray's worker pool rather than an ActorPoolStrategy: the scan already warmed these
        # workers (imports), and a part is coarse enough that per-task overhead does not matter.
        ds = ds.map_batches(_write_batch, batch_size=1, num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=self.workers))
        for row in ds.iter_rows():
            yield json.loads(row["record"])
