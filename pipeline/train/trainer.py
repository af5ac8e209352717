"""The training loop: one rank of a data-parallel DeepSpeed job.

``Trainer`` holds the parts (engine, loaders, checkpoints, metrics, EMA, callbacks, the loop's state), each behind
its own small interface in its own module; ``Trainer.run`` is the loop and reads top to bottom. Periodic work
decides its own cadence (``should_log``, ``should_eval``, ``should_save``); what is not training (fault injection
for tests, sample recording) hangs on the loop's callbacks (``pipeline.train.callbacks``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from streaming.base.util import clean_stale_shared_memory

from pipeline.artifacts import RunDir, TrainResult
from pipeline.train import callbacks as callbacks_
from pipeline.train import export
from pipeline.train.cadence import Cadence
from pipeline.train.checkpoint import CheckpointManager, tag_for
from pipeline.train.config import ConfigError, TrainConfig, check_canonical_nodes, dataset_manifest, make_plan
from pipeline.train.data import (
    build_eval_loader,
    build_train_loader,
    local_dirs,
    micro_batches,
    release_stale_shared_memory,
)
from pipeline.train.device_input import to_device
from pipeline.train.distributed import setup_distributed
from pipeline.train.ema import ShardedEma
from pipeline.train.engine import build_model, initialize, input_dtype
from pipeline.train.loss import build_loss
from pipeline.train.metrics import MetricsSink, TrainMetrics, peak_tflops
from pipeline.train.state import TrainState
from pipeline.train.step import StepResult, TrainStep

__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "Trainer", "run"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (on any rank) more often than ``train.max_nonfinite_skips`` allows."""


def run(config: TrainConfig, *, resume: str = "auto", force_resume: bool = False) -> TrainResult:
    """Train in the current process group (one rank): resume, train to the plan's end, export."""
    return Trainer(config, resume=resume, force_resume=force_resume).run()


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: str = "auto", force_resume: bool = False,
                 callbacks: Iterable[callbacks_.Callback] = ()) -> None:
        self.config = config
        self.ctx = ctx = setup_distributed()
        check_nodes(config, ctx)  # before any compute: streaming would fail (or hang) on a world it cannot split
        self.plan = plan = make_plan(config, ctx.world_size)
        self.run_dir = RunDir(config.output_dir)
        self.out = Path(config.output_dir)
        self.checkpoints = CheckpointManager(self.run_dir.local(RunDir.CHECKPOINTS), keep_last=config.checkpoint.keep_last,
                                             upload_uri=config.checkpoint.upload_uri, rank=ctx.rank,
                                             local_rank=ctx.local_rank)
        # Found before the engine is built: another world size resumes through a universal checkpoint.
        found = self.checkpoints.find(resume)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.engine, self.scheduler = initialize(
            build_model(config, plan), config, plan,  # under ZeRO-3 built partitioned
            load_universal=bool(found and found.needs_universal(ctx.world_size)))
        self.ema = ShardedEma(self.engine, config.ema.decay, "cpu" if config.ema.device == "cpu" else None) \
            if config.ema.decay else None
        self._release_stale_shared_memory()
        # One read of the manifest for both loaders: at ImageNet-21K scale it is megabytes, on every rank.
        manifest = dataset_manifest(config)
        self.loader = build_train_loader(config, plan, manifest=manifest)
        self.eval_loader = build_eval_loader(config, manifest=manifest)
        self.state, self.last_checkpoint = TrainState(), None
        torch.manual_seed(config.seed + 1 + ctx.rank)  # each rank draws its own drop-path masks
        self.resume(found, force_resume)

        stop_after = config.train.stop_after_steps
        self.stop_at = plan.total_steps if stop_after is None else min(plan.total_steps, self.state.step + stop_after)
        self.should_log = Cadence.every(config.logging.interval_steps, at=self.stop_at)
        self.should_eval = Cadence.every(config.eval.interval_steps, at=plan.total_steps)
        self.should_save = Cadence.every(config.checkpoint.interval_steps, at=self.stop_at)
        self.should_update_ema = Cadence.every(config.ema.every_steps)
        self.sink = MetricsSink(self.out, enabled=ctx.rank == 0, mlflow_cfg=config.logging, run_name=config.name,
                                params={**_flat(config.to_dict()), **_flat(plan.to_dict(), "plan")},
                                run_id=self.state.mlflow_run_id)
        self.state.mlflow_run_id = self.sink.run_id
        self.sink.truncate(self.state.step)
        ctx.print(f"plan: {json.dumps(plan.to_dict())}")
        if ctx.rank == 0:
            self.run_dir.write_json(RunDir.PLAN, plan.to_dict())
        self.dtype = input_dtype(config)
        self.callbacks = callbacks_.Callbacks([*callbacks_.from_env(), *callbacks])
        if config.train.record_samples:
            self.callbacks.callbacks.append(callbacks_.RecordSamples(self.out, ctx.rank))
        self.train_step = TrainStep(self.engine, build_loss(config.loss), self.inputs,
                                    grad_accum_steps=plan.grad_accum_steps, all_true=ctx.all_true,
                                    device=ctx.device, callbacks=self.callbacks, owner=self,
                                    all_sum=ctx.all_sum, world_size=ctx.world_size)
        self.metrics = TrainMetrics(
            self.sink, mean=ctx.mean, world_size=ctx.world_size, flops_per_image=plan.train_flops_per_image,
            peak_per_device=peak_tflops(config.logging.peak_tflops),
            bar=ctx.progress(total=plan.total_steps, initial=self.state.step, enabled=config.logging.progress_bar))

    def run(self) -> TrainResult:
        state = self.state
        while state.step < self.stop_at:
            # A fresh epoch, or the rest of the resumed one: one batch per step, split into micro-batches (data.py).
            batches = (m for b in self.loader for m in micro_batches(b, self.plan.grad_accum_steps))
            while state.step < self.stop_at:
                result = self.train_step(batches, keep_batches=self._next_skip_is_fatal())
                if result.applied:
                    state.samples_seen += result.images
                else:
                    self.skip_nonfinite(result)
                state.advance(self.plan.steps_per_epoch)
                if self.ema and self.should_update_ema(state.step):
                    self.ema.update()
                self.metrics.step_end(result.loss, applied=result.applied, images=result.images,
                                      data_wait=result.data_wait)
                if self.should_log(state.step):
                    self.metrics.log(state.step, {**self.optimizer_metrics(), "samples_seen": state.samples_seen})
                if self.should_eval(state.step):
                    self.metrics.log_eval(state.step, self.evaluate())
                if self.should_save(state.step):
                    self.last_checkpoint = self.save_checkpoint()
                self.callbacks.on_step_end(self)
                if state.at_epoch_start:
                    break  # end of epoch: the rest of this pass (less than a global batch) is dropped
            del batches
        return self.finish()

    # -- the parts the loop calls ------------------------------------------------------------------
    def inputs(self, batch: dict, *, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch (uint8 pixels) as the model's input and target on this rank's device; training
        batches are mixed (MixUp/CutMix, when the recipe has them) after normalisation."""
        return to_device(batch, self.ctx.device, self.dtype, self.config,
                         mix_classes=self.plan.num_classes if train else None)

    def optimizer_metrics(self) -> dict[str, float]:
        grad_norm = self.engine.get_global_grad_norm()
        return {"lr": self.scheduler.get_last_lr()[0], "epoch": self.state.epoch,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 and cross-entropy on the eval split; padded duplicates across ranks are counted once, masked
        samples (duplicates the sharding found, ``data.py``) not at all."""
        limit, ctx = self.config.eval.max_samples, self.ctx
        self.engine.eval()
        rows = []
        n_batches = None if limit is None else -(-limit // (self.config.eval.batch_size * ctx.world_size))
        for i, batch in enumerate(self.eval_loader):
            if n_batches is not None and i >= n_batches:
                break
            x, y = self.inputs(batch, train=False)
            logits = self.engine(x).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            correct = logits.argmax(-1).eq(y)
            rows += [r for r, keep in zip(zip(batch["idx"].tolist(), loss.tolist(), correct.tolist()),
                                          batch["keep"].tolist()) if keep]  # masked: counted through its twin
        self.engine.train()
        unique = {idx: (loss, correct) for idx, loss, correct in ctx.gather(rows)}
        if not unique:
            return {}
        n = len(unique)
        return {"eval_loss": sum(v[0] for v in unique.values()) / n,
                "eval_top1": sum(v[1] for v in unique.values()) / n, "eval_samples": n}

    def save_checkpoint(self, *, tag: str | None = None, mark_latest: bool = True) -> Path:
        """Collective. DeepSpeed's state (weights, optimizer, schedule) plus this trainer's ``state_dict``."""
        # The sharded EMA is saved beside the engine's state (each rank its partition, in DeepSpeed's layout).
        return self.checkpoints.save(self.engine, self.state.step, self.state_dict(),
                                     config_hash=self.config.config_hash, world_size=self.ctx.world_size,
                                     tag=tag, mark_latest=mark_latest, ema=self.ema)

    def state_dict(self) -> dict:
        """The checkpoint's client state: the loop's state, the loader's position (global: any world size)."""
        loader_state = self.loader.state_dict()
        if self.state.at_epoch_start:
            # The epoch ended with less than a global batch unread: resume at the start of the next one.
            loader_state = {**loader_state, "epoch": self.state.epoch, "sample_in_epoch": 0}
        return {"train_state": self.state.state_dict(), "loader": loader_state, "config_hash": self.config.config_hash}

    def load_state_dict(self, client: dict) -> None:
        self.state.load_state_dict(client["train_state"])
        self.loader.load_state_dict(client["loader"])

    def resume(self, found, force: bool) -> None:
        """From ``found`` (``CheckpointManager.find``): engine, EMA and RNG through the checkpoint manager (a
        universal checkpoint when the world size changed), then this trainer's client state."""
        if found:
            client = self.checkpoints.load(self.engine, found, config_hash=self.config.config_hash,
                                           world_size=self.ctx.world_size, force=force, ema=self.ema)
            self.load_state_dict(client)
            self.last_checkpoint = found.path
            via = f", written by {found.world_size} ranks: universal checkpoint" \
                if found.needs_universal(self.ctx.world_size) else ""
            self.ctx.print(f"resumed from {found.path} at step {self.state.step} (epoch {self.state.epoch}{via})")

    # -- non-finite steps --------------------------------------------------------------------------
    def _next_skip_is_fatal(self) -> bool:
        # The step's batches are kept (for the dump) only when one more skip would stop the run.
        return self.state.nonfinite_skips >= self.config.train.max_nonfinite_skips

    def skip_nonfinite(self, result: StepResult) -> None:
        """A discarded step (``step.py``): counted; past ``train.max_nonfinite_skips`` the run stops, leaving each
        rank's batches of the step and the weights before it (the discarded step did not change them)."""
        state, limit, ctx = self.state, self.config.train.max_nonfinite_skips, self.ctx
        state.nonfinite_skips += 1
        where = f"step {state.step} (epoch {state.epoch})"
        if state.nonfinite_skips <= limit:
            ctx.print(f"non-finite loss at {where}: optimizer step skipped ({state.nonfinite_skips}/{limit})",
                      all_ranks=True)
            return
        losses = result.losses.tolist()
        dump = self.run_dir.local(RunDir.NONFINITE, f"step{state.step:08d}_rank{ctx.rank:05d}.pt")
        dump.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": state.step, "loss": result.losses.cpu(),
                    "image": torch.cat([b["image"] for b in result.batches]),
                    "label": torch.cat([b["label"] for b in result.batches]),
                    "key": [k for b in result.batches for k in b["key"]]}, dump)
        # Tagged apart, so that resume "auto" never picks it up.
        path = self.save_checkpoint(tag=f"nonfinite_{tag_for(state.step)}", mark_latest=False)
        what = "loss" if not all(map(math.isfinite, losses)) else "gradients (finite losses)"
        raise NonFiniteLossError(
            f"non-finite {what} ({', '.join(f'{v:.4g}' for v in losses)} on rank {ctx.rank}) at {where} on some "
            f"rank, after {state.nonfinite_skips - 1} skipped steps (train.max_nonfinite_skips={limit}); weights "
            f"before the step in {path}, each rank's batches of the step in {dump.parent}"
        )

    # -- the end -----------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        config, ctx, state = self.config, self.ctx, self.state
        self.metrics.bar.close()
        finished = state.step >= self.plan.total_steps
        paths = export.export_all(self.engine, self.ema, config, self.plan, self.last_checkpoint, self.out, ctx) \
            if finished and self.last_checkpoint else {}
        png = self.sink.plot(f"{config.name} ({config.model.name})")
        for p in (png, paths.get("model_config")):
            if p:
                self.sink.log_artifact(Path(p))
        result = TrainResult(output_dir=str(self.out), checkpoint_dir=str(self.checkpoints.directory),
                             last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                             step=state.step, epoch=state.epoch, total_steps=self.plan.total_steps,
                             finished=finished, config_hash=config.config_hash, final_metrics=self.metrics.last,
                             mlflow_run_id=self.sink.run_id, curve_png=str(png) if png else None, **paths)
        if ctx.rank == 0:
            self.run_dir.write_result(result)
        self.sink.close()
        ctx.barrier()
        return result

    def _release_stale_shared_memory(self) -> None:
        if self.config.data.clean_stale_shared_memory:
            clean_stale_shared_memory()  # collective; every leftover on this node, other jobs' included
        elif self.ctx.local_rank == 0 and (n := release_stale_shared_memory(local_dirs(self.config))):
            self.ctx.print(f"released streaming shared memory left by a crashed run ({n} set(s))", all_ranks=True)
        self.ctx.barrier()


def check_nodes(config: TrainConfig, ctx) -> None:
    """Collective. Every rank's node must hold as many ranks as the others (streaming reads its node count as
    ``WORLD_SIZE // LOCAL_WORLD_SIZE``), and that node count must suit ``data.num_canonical_nodes``. The same
    ConfigError on every rank, before any compute (a Ray Train restart on a size that cannot work fails here)."""
    sizes = sorted(set(ctx.gather([ctx.local_world_size])))
    if len(sizes) > 1:
        raise ConfigError(f"data.num_canonical_nodes: the {ctx.world_size} ranks are spread unevenly over the nodes "
                          f"({' / '.join(map(str, sizes))} ranks on a node); streaming needs the same number of "
                          "ranks on every node")
    check_canonical_nodes(config, ctx.world_size, sizes[0])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out |= _flat(v, key) if isinstance(v, dict) and v else {key: v}
    return out

