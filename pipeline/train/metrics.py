"""Training metrics: step timing (data wait vs compute), throughput, achieved TFLOP/s and
utilisation, memory; console progress, MLflow (rank 0), a JSONL history and a curve PNG.

``TrainMetrics`` is the loop's side: it keeps the loss on the device between logs (no host sync per step);
``MetricsSink`` is where rows go."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import RunDir
from pipeline.secrets import scrub
from pipeline.tracking import resolve_tracking_uri

# Dense bf16 peak TFLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    # ru_maxrss is in KiB on Linux.
    return {"mem_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class StepTimer:
    """Accumulates time waiting for batches vs total step time over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0
        self.steps = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def window(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {"elapsed": elapsed, "data_wait_frac": self.data_wait / elapsed,
                "images_per_s": self.images / elapsed, "steps": self.steps}


def throughput_metrics(window: dict, *, flops_per_image: float | None, peak_per_device: float | None,
                       world_size: int) -> dict[str, float]:
    out = {"images_per_s": window["images_per_s"], "data_wait_frac": window["data_wait_frac"]}
    if flops_per_image:
        achieved = window["images_per_s"] * flops_per_image / 1e12
        out["tflops"] = achieved
        out["tflops_per_device"] = achieved / world_size
        if peak_per_device:
            out["mfu"] = achieved / (peak_per_device * world_size)
    return out


class MetricsSink:
    """Rank-0 sink: JSONL history (survives resume), MLflow, the curve PNG."""

    def __init__(self, output_dir: Path, *, enabled: bool, mlflow_cfg, run_name: str, params: dict,
                 run_id: str | None) -> None:
        self.enabled = enabled
        self.history_path = output_dir / RunDir.METRICS
        self.png_path = output_dir / RunDir.CURVE
        self.mlflow = None
        self.run_id = run_id
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if mlflow_cfg.mlflow:
            import mlflow  # lazy: MLflow is slow to import and off in many runs; only rank 0 logs

            mlflow.set_tracking_uri(resolve_tracking_uri(mlflow_cfg.mlflow_tracking_uri))
            mlflow.set_experiment(mlflow_cfg.mlflow_experiment)
            # A resumed run continues the same MLflow run, so its curves stay one curve.
            run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
            self.run_id = run.info.run_id
            if not run_id:
                # Params are readable by anyone with access to the server: no credentials in them.
                items = [(k, str(v)[:500]) for k, v in scrub(params).items()]
                for i in range(0, len(items), 90):  # tracking stores take at most 100 params per batch
                    mlflow.log_params(dict(items[i:i + 90]))
            self.mlflow = mlflow

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}
        with self.history_path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.mlflow:
            self.mlflow.log_metrics(clean, step=step)

    def history(self, up_to_step: int | None = None) -> list[dict]:
        if not self.history_path.is_file():
            return []
        rows = [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]
        return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]

    def truncate(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        if self.enabled and self.history_path.is_file():
            rows = self.history(step)
            self.history_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log_artifact(self, path: Path) -> None:
        if self.mlflow and path.is_file():
            self.mlflow.log_artifact(str(path))

    def plot(self, title: str) -> Path | None:
        if not self.enabled:
            return None
        rows = self.history()
        if not rows:
            return None
        # lazy: matplotlib only for the curve at the end, with the Agg backend chosen before pyplot loads
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: once the backend is chosen

        panels = [("loss", "train loss"), ("lr", "learning rate"), ("eval_top1", "eval top-1"),
                  ("images_per_s", "images/s")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
        for ax, (key, label) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None)
            ax.set_title(label)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(self.png_path, dpi=100)
        plt.close(fig)
        return self.png_path

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow:
            self.mlflow.end_run(status=status)
            self.mlflow = None


class TrainMetrics:
    """The training loop's metrics between two logs: steps, images, data wait, and the loss, which stays on the
    device until a log reads it (one all-reduce for this step's loss and the window's mean).

    ``mean(tensor) -> list[float]`` averages over ranks; ``log`` writes one row to the sink and the progress bar.
    """

    def __init__(self, sink: MetricsSink, *, mean: Callable[[torch.Tensor], list[float]],
                 world_size: int, flops_per_image: float | None, peak_per_device: float | None, bar) -> None:
        self.sink = sink
        self.mean = mean
        self.world_size = world_size
        self.flops_per_image = flops_per_image
        self.peak_per_device = peak_per_device
        self.bar = bar
        self.timer = StepTimer()
        self.last: dict[str, float] = {}  # the latest row, evaluation included (the run's final metrics)
        self._loss: torch.Tensor | None = None
        self._window: torch.Tensor | None = None
        self._window_steps = 0

    def step_end(self, loss: torch.Tensor, *, applied: bool, images: int, data_wait: float) -> None:
        self.timer.waited(data_wait)
        self.timer.images += images  # the step's kept samples on every rank (masked ones do not count)
        self.timer.steps += 1
        self._loss = loss.detach().double()
        if applied:  # a discarded step's loss is not finite; the window averages the steps taken
            self._window = self._loss if self._window is None else self._window + self._loss
            self._window_steps += 1
        self.bar.update(1)

    def log(self, step: int, extra: dict[str, Any]) -> dict[str, float]:
        """This step's loss (so a resumed run logs the same curve), the mean since the last log, ``extra``,
        throughput and memory."""
        device_loss = self._loss if self._loss is not None else torch.tensor(float("nan"), dtype=torch.float64)
        window = self._window / self._window_steps if self._window_steps else torch.full_like(device_loss, float("nan"))
        loss, loss_window = self.mean(torch.stack([device_loss, window.to(device_loss.device)]))
        self._window, self._window_steps = None, 0
        m = {"loss": loss, "loss_window": loss_window, **extra,
             **throughput_metrics(self.timer.window(), flops_per_image=self.flops_per_image,
                                  peak_per_device=self.peak_per_device, world_size=self.world_size),
             **memory_gib()}
        self.timer.reset()
        self.sink.log(step, m)
        self.bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss", "lr", "images_per_s", "data_wait_frac") if k in m})
        self.last = m
        return m

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.sink.log(step, metrics)
        self.last = self.last | metrics
        self.timer.reset()  # evaluation time is not training throughput
