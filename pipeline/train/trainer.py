"""The training loop: one rank of a data-parallel DeepSpeed job. ``run`` reads top to bottom;
the pieces (model/engine, data, checkpoints, metrics, EMA) live in their own modules."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from streaming.base.util import clean_stale_shared_memory

from pipeline.train import export
from pipeline.train.checkpoint import CheckpointManager, tag_for
from pipeline.train.config import Plan, TrainConfig, make_plan
from pipeline.train.data import (
    build_eval_loader,
    build_train_loader,
    local_dirs,
    micro_batches,
    release_stale_shared_memory,
)
from pipeline.train.distributed import DistContext, setup_distributed
from pipeline.train.ema import ShardedEma
from pipeline.train.engine import build_model, initialize, input_dtype
from pipeline.train.loss import build_loss
from pipeline.train.metrics import MetricsSink, StepTimer, memory_gib, peak_tflops, throughput_metrics

RESULT_FILE = "result.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (on any rank) more often than ``train.max_nonfinite_skips`` allows."""


@dataclass
class TrainResult:
    output_dir: str
    checkpoint_dir: str
    last_checkpoint: str | None
    step: int
    epoch: int
    total_steps: int
    finished: bool
    config_hash: str
    final_metrics: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    weights: str | None = None
    ema_weights: str | None = None
    model_config: str | None = None
    curve_png: str | None = None

    @classmethod
    def read(cls, output_dir: str | Path) -> TrainResult:
        return cls(**json.loads(Path(output_dir, RESULT_FILE).read_text()))


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_skips: int = 0
    mlflow_run_id: str | None = None


def run(config: TrainConfig, *, resume: str = "auto", force_resume: bool = False) -> TrainResult:
    ctx = setup_distributed()
    plan = make_plan(config, ctx.world_size)
    out = Path(config.output_dir)
    ckpts = CheckpointManager(out / "checkpoints", keep_last=config.checkpoint.keep_last,
                              upload_uri=config.checkpoint.upload_uri, rank=ctx.rank, local_rank=ctx.local_rank)
    # Found before the engine is built: another world size resumes through a universal checkpoint.
    found = ckpts.find(resume)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    engine, scheduler = initialize(build_model(config, plan), config, plan,
                                   load_universal=bool(found and found.needs_universal(ctx.world_size)))
    ema = ShardedEma(engine, config.ema.decay, "cpu" if config.ema.device == "cpu" else None) \
        if config.ema.decay else None
    if config.data.clean_stale_shared_memory:
        clean_stale_shared_memory()  # collective; every leftover on this node, other jobs' included
    elif ctx.local_rank == 0 and (n := release_stale_shared_memory(local_dirs(config))):
        ctx.print(f"released streaming shared memory left by a crashed run ({n} set(s))", all_ranks=True)
    ctx.barrier()
    loader, eval_loader = build_train_loader(config, plan), build_eval_loader(config)
    state, last_ckpt = TrainState(), None
    torch.manual_seed(config.seed + 1 + ctx.rank)  # each rank draws its own drop-path masks
    if found:
        last_ckpt = found.path
        client = ckpts.load(engine, found, config_hash=config.config_hash, world_size=ctx.world_size,
                            force=force_resume, ema=ema)
        state = TrainState(**client["train_state"])
        loader.load_state_dict(client["loader"])
        via = f" (written by {found.world_size} ranks: universal checkpoint)" \
            if found.needs_universal(ctx.world_size) else ""
        ctx.print(f"resumed from {found.path} at step {state.step} (epoch {state.epoch}){via}")
    sink = MetricsSink(out, enabled=ctx.rank == 0, mlflow_cfg=config.logging, run_name=config.name,
                       params={**_flat(config.to_dict()), **_flat(plan.to_dict(), "plan")}, run_id=state.mlflow_run_id)
    state.mlflow_run_id = sink.run_id
    sink.truncate(state.step)
    ctx.print(f"plan: {json.dumps(plan.to_dict())}")
    if ctx.rank == 0:
        Path(out, "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))

    loss_fn, dtype = build_loss(config.loss), input_dtype(config)
    timer, window_loss, metrics = StepTimer(), [], {}
    stop_at = plan.total_steps if config.train.stop_after_steps is None \
        else min(plan.total_steps, state.step + config.train.stop_after_steps)
    bar = ctx.progress(total=plan.total_steps, initial=state.step, enabled=config.logging.progress_bar)
    while state.step < stop_at:
        batches = (m for b in loader for m in micro_batches(b, plan.grad_accum_steps))  # this epoch's rest
        while state.step_in_epoch < plan.steps_per_epoch and state.step < stop_at:
            loss = train_step(engine, batches, loss_fn, dtype, ctx, timer, state, config, plan, ckpts)
            state.step += 1
            state.step_in_epoch += 1
            if state.step_in_epoch == plan.steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if ema and state.step % config.ema.every_steps == 0:
                ema.update()
            window_loss.append(loss)
            bar.update(1)
            if state.step % config.logging.interval_steps == 0 or state.step == stop_at:
                metrics = log_window(engine, scheduler, timer, window_loss, ctx, config, plan, state, sink, bar)
            if config.eval.interval_steps and state.step % config.eval.interval_steps == 0 or \
                    state.step == plan.total_steps:
                metrics |= evaluate(engine, eval_loader, config, ctx)
                sink.log(state.step, {k: v for k, v in metrics.items() if k.startswith("eval_")})
                timer.reset()
            if config.checkpoint.interval_steps and state.step % config.checkpoint.interval_steps == 0 or \
                    state.step == stop_at:
                last_ckpt = ckpts.save(engine, state.step, client_state(loader, state, config),
                                       config_hash=config.config_hash, world_size=ctx.world_size, ema=ema)
            _maybe_lose_worker(state.step, ctx, out)
            if state.step_in_epoch == 0:
                break  # end of epoch: the rest of this pass (less than a global batch) is dropped
        del batches
    bar.close()

    finished = state.step >= plan.total_steps
    paths = export.export_all(engine, ema, config, plan, last_ckpt, out, ctx) if finished and last_ckpt else {}
    png = sink.plot(f"{config.name} ({config.model.name})")
    for p in (png, paths.get("model_config")):
        sink.log_artifact(Path(p)) if p else None
    result = TrainResult(output_dir=str(out), checkpoint_dir=str(ckpts.directory),
                         last_checkpoint=str(last_ckpt) if last_ckpt else None, step=state.step,
                         epoch=state.epoch, total_steps=plan.total_steps, finished=finished,
                         config_hash=config.config_hash, final_metrics=metrics, mlflow_run_id=sink.run_id,
                         curve_png=str(png) if png else None, **paths)
    if ctx.rank == 0:
        Path(out, RESULT_FILE).write_text(json.dumps(asdict(result), indent=2))
    sink.close()
    ctx.barrier()
    return result


def train_step(engine, batches, loss_fn, dtype, ctx: DistContext, timer: StepTimer, state: TrainState,
               config: TrainConfig, plan: Plan, ckpts: CheckpointManager) -> float:
    """One optimizer step: ``grad_accum_steps`` micro-batches, forward/backward, then DeepSpeed's step."""
    total, done = 0.0, 0
    while done < plan.grad_accum_steps:
        t0 = time.perf_counter()
        batch = next(batches)
        timer.waited(time.perf_counter() - t0)
        x = batch["image"].to(ctx.device, dtype, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        loss = loss_fn(engine(x), y)
        if _fault_injected(state.step) or not ctx.all_finite(loss):
            handle_nonfinite(loss, batch, engine, state, config, ckpts, ctx)
            continue  # the micro-batch is dropped; the next one takes its place
        engine.backward(loss)
        engine.step()
        if config.train.record_samples:
            ctx.append_jsonl(Path(config.output_dir, "samples", f"rank{ctx.rank:05d}.jsonl"),
                             {"step": state.step, "micro": done, "keys": list(batch["key"])})
        total += loss.item()
        done += 1
        timer.images += x.shape[0] * ctx.world_size
    timer.steps += 1
    return total / plan.grad_accum_steps


def handle_nonfinite(loss, batch, engine, state: TrainState, config: TrainConfig, ckpts: CheckpointManager,
                     ctx: DistContext) -> None:
    state.nonfinite_skips += 1
    where = f"step {state.step} (epoch {state.epoch})"
    if state.nonfinite_skips <= config.train.max_nonfinite_skips:
        ctx.print(f"non-finite loss at {where}: micro-batch skipped "
                  f"({state.nonfinite_skips}/{config.train.max_nonfinite_skips})", all_ranks=True)
        return
    dump = Path(config.output_dir, "nonfinite", f"step{state.step:08d}_rank{ctx.rank:05d}.pt")
    dump.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"loss": loss.detach().cpu(), "image": batch["image"], "label": batch["label"],
                "key": list(batch["key"]), "step": state.step}, dump)
    # The weights before this step, to reproduce it; tagged apart so resume "auto" never picks it up.
    path = ckpts.save(engine, state.step, {"train_state": asdict(state)}, config_hash=config.config_hash,
                      world_size=ctx.world_size, tag=f"nonfinite_{tag_for(state.step)}", mark_latest=False)
    raise NonFiniteLossError(
        f"non-finite loss ({loss.item()}) at {where} on some rank, after {state.nonfinite_skips - 1} skipped "
        f"micro-batches (train.max_nonfinite_skips={config.train.max_nonfinite_skips}); weights before the step "
        f"in {path}, the offending batches in {dump.parent}"
    )


def client_state(loader, state: TrainState, config: TrainConfig) -> dict:
    loader_state = loader.state_dict()
    if state.step_in_epoch == 0:
        # The epoch ended with less than a global batch unread: resume at the start of the next one.
        loader_state = {**loader_state, "epoch": state.epoch, "sample_in_epoch": 0}
    return {"train_state": asdict(state), "loader": loader_state, "config_hash": config.config_hash}


def log_window(engine, scheduler, timer: StepTimer, window_loss: list, ctx: DistContext, config: TrainConfig,
               plan: Plan, state: TrainState, sink: MetricsSink, bar) -> dict:
    # "loss" is this step's (so a resumed run logs the same curve); "loss_window" averages since the last log.
    loss, loss_window = ctx.mean(window_loss[-1]), ctx.mean(sum(window_loss) / max(1, len(window_loss)))
    window_loss.clear()
    grad_norm = engine.get_global_grad_norm()
    m = {"loss": loss, "loss_window": loss_window, "lr": scheduler.get_last_lr()[0], "epoch": state.epoch,
         "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
         **throughput_metrics(timer.window(), flops_per_image=plan.train_flops_per_image,
                              peak_per_device=peak_tflops(config.logging.peak_tflops), world_size=ctx.world_size),
         **memory_gib()}
    timer.reset()
    sink.log(state.step, m)
    bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss", "lr", "images_per_s", "data_wait_frac") if k in m})
    return m


@torch.no_grad()
def evaluate(engine, loader, config: TrainConfig, ctx: DistContext) -> dict:
    """Top-1 and cross-entropy on the eval split; padded duplicates across ranks are counted once."""
    limit = config.eval.max_samples
    engine.eval()
    rows = []
    n_batches = None if limit is None else -(-limit // (config.eval.batch_size * ctx.world_size))
    for i, batch in enumerate(loader):
        if n_batches is not None and i >= n_batches:
            break
        logits = engine(batch["image"].to(ctx.device, input_dtype(config))).float()
        y = batch["label"].to(ctx.device)
        loss = F.cross_entropy(logits, y, reduction="none")
        correct = logits.argmax(-1).eq(y)
        rows += zip(batch["idx"].tolist(), loss.tolist(), correct.tolist())
    engine.train()
    unique = {idx: (loss, correct) for idx, loss, correct in ctx.gather(rows)}
    if not unique:
        return {}
    n = len(unique)
    return {"eval_loss": sum(v[0] for v in unique.values()) / n,
            "eval_top1": sum(v[1] for v in unique.values()) / n, "eval_samples": n}


_INJECTED: set[int] = set()


def _fault_injected(step: int) -> bool:
    # Fault injection for tests of the non-finite path (a NaN cannot be provoked reliably otherwise):
    # the first micro-batch of step COATNET_FAULT_NONFINITE_STEP counts as non-finite on every rank.
    if os.environ.get("COATNET_FAULT_NONFINITE_STEP") == str(step) and step not in _INJECTED:
        _INJECTED.add(step)
        return True
    return False


def _maybe_lose_worker(step: int, ctx: DistContext, out: Path) -> None:
    # Fault injection for tests of launcher restarts: the last rank dies abruptly after step
    # COATNET_FAULT_EXIT_STEP, once per output directory (as a lost machine would).
    marker = out / ".fault-exit-done"
    if os.environ.get("COATNET_FAULT_EXIT_STEP") == str(step) and ctx.rank == ctx.world_size - 1 \
            and not marker.exists():
        marker.touch()
        os._exit(1)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out |= _flat(v, key) if isinstance(v, dict) and v else {key: v}
    return out
