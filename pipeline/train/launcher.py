"""Start the ranks of a training job and wait for them: local processes, torchrun, the deepspeed
launcher, or Ray Train's TorchTrainer. Every launcher runs the same ``trainer.run`` on the same
resolved config (written to ``{output_dir}/config.yaml``); rank 0 writes ``result.json``, which
the launching process reads back as the ``TrainResult``.

Run as a module, this file is the per-rank entry point: ``python -m pipeline.train.launcher CONFIG``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

from pipeline import storage
from pipeline.artifacts import RunDir, TrainResult
from pipeline.errors import UserError
from pipeline.launch_options import LAUNCHERS, RayOptions
from pipeline.tracking import resolve_tracking_uri
from pipeline.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    batch_split,
    check_canonical_nodes,
    check_shards,
    dataset_root,
    from_dict,
    load_config,
    make_plan,
    node_count_problem,
)
from pipeline.train.data import streaming_env
from pipeline.train.distributed import free_port
from pipeline.train.trainer import run

# Variables a rank needs from the launching environment when it is not a child process (Ray workers);
# COATNET_CALLBACKS names the loop's callbacks (tests inject faults through it: pipeline/train/faults.py).
FORWARDED_ENV = ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "DS_ACCELERATOR", "COATNET_CALLBACKS")
REPO_ROOT = Path(__file__).resolve().parents[2]


class LaunchError(UserError, RuntimeError):
    """A rank failed; the message carries the tail of its log."""


def resolve(config_or_path: TrainConfig | str | os.PathLike, overrides=(), *, check_data: bool = True) -> TrainConfig:
    if isinstance(config_or_path, TrainConfig):
        cfg = from_dict(_apply(config_or_path, overrides)) if overrides else config_or_path
        if check_data:
            check_shards(cfg)
        return cfg
    return load_config(config_or_path, list(overrides), check_data=check_data)


def _apply(cfg: TrainConfig, overrides) -> dict:
    return apply_overrides(cfg.to_dict(), list(overrides))


def absolutize(cfg: TrainConfig) -> TrainConfig:
    """Paths made absolute, so ranks started elsewhere (Ray workers) see the same files."""
    def a(p: str | None) -> str | None:
        return p if p is None or storage.is_remote(p) else str(Path(p).resolve())

    uri = resolve_tracking_uri(cfg.logging.mlflow_tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    init = cfg.model.init_weights
    # The sharding job's LATEST pointer is followed once, here: every rank and every resume reads the same root.
    root = dataset_root(a(cfg.data.root))
    return from_dict({
        **cfg.to_dict(),
        "output_dir": a(cfg.output_dir),
        "data": {**cfg.to_dict()["data"], "root": root, "cache_dir": a(cfg.data.cache_dir)},
        "model": {**cfg.to_dict()["model"], "init_weights": a(init)},
        "checkpoint": {**cfg.to_dict()["checkpoint"], "upload_uri": a(cfg.checkpoint.upload_uri)},
        "logging": {**cfg.to_dict()["logging"], "mlflow_tracking_uri": uri},
    })


def launch(config_or_path: TrainConfig | str | os.PathLike, overrides=(), *, launcher: str = "local",
           nproc: int = 1, resume: str = "auto", force_resume: bool = False,
           ray: RayOptions | None = None, timeout_s: float | None = None) -> TrainResult:
    """Start ``nproc`` ranks with ``launcher`` and wait; returns rank 0's TrainResult.

    Everything that can be checked is checked here, before a process starts: the config, the
    batch split for this world size, and that the shards exist.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    world = (ray.num_workers or nproc) if launcher == "ray" and ray else nproc
    cfg = absolutize(resolve(config_or_path, overrides))
    make_plan(cfg, world, with_counts=False)
    if launcher != "ray":
        check_canonical_nodes(cfg, world, world)  # the process launchers start one node's ranks
    elif ray and ray.workers_per_node:
        check_canonical_nodes(cfg, world, min(world, ray.workers_per_node))
    if launcher == "ray" and ray and ray.min_workers is not None:
        _check_elastic(cfg, ray.min_workers, world, ray.workers_per_node)
    run = RunDir(cfg.output_dir)
    out = run.path
    out.mkdir(parents=True, exist_ok=True)
    config_file = run.local(RunDir.CONFIG)
    config_file.write_text(cfg.to_yaml())
    run.local(RunDir.RESULT).unlink(missing_ok=True)  # never hand back a previous run's result
    args = [str(config_file), "--resume", resume] + (["--force-resume"] if force_resume else [])
    if launcher == "ray":
        _launch_ray(cfg, world, resume, force_resume, ray or RayOptions())
    else:
        _launch_processes(launcher, world, args, out, timeout_s)
    if not run.local(RunDir.RESULT).is_file():
        raise LaunchError(f"training ended without writing {run.local(RunDir.RESULT)}; see the logs in {run.logs}")
    return run.read_result()


# ---------------------------------------------------------------------------------------------
# Local processes, torchrun, deepspeed.

def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _launch_processes(launcher: str, nproc: int, args: list[str], out: Path, timeout_s: float | None) -> None:
    run = RunDir(str(out))
    logs = run.local(RunDir.LOGS)
    logs.mkdir(exist_ok=True)
    env = _child_env()
    port = str(free_port())
    py = sys.executable
    if launcher == "local":
        cmds = []
        for rank in range(nproc):
            e = {**env, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            cmds.append(([py, "-m", "pipeline.train.launcher", *args], e, rank))
    elif launcher == "torchrun":
        cmds = [([py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                  f"--master_port={port}", "-m", "pipeline.train.launcher", *args], env, 0)]
    else:  # deepspeed's launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE: the worker completes the env
        cmds = [([py, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", f"--master_port={port}",
                  "--no_local_rank", "--module", "pipeline.train.launcher", *args], env, 0)]
    procs = []
    for cmd, e, rank in cmds:
        log = open(run.rank_log(rank), "w")  # noqa: SIM115 - closed below
        p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE if rank == 0 else log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        if rank == 0:  # rank 0 (or the launcher) speaks on the console too; every rank has its log file
            threading.Thread(target=_tee, args=(p.stdout, log), daemon=True).start()
        procs.append((p, log, rank))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed = None
    try:
        while any(p.poll() is None for p, _, _ in procs):
            failed = next(((p, r) for p, _, r in procs if p.poll() not in (None, 0)), None)
            if failed or (deadline and time.monotonic() > deadline):
                break
            time.sleep(0.2)
        failed = failed or next(((p, r) for p, _, r in procs if p.poll() not in (None, 0)), None)
        if failed is None and deadline and time.monotonic() > deadline:
            raise LaunchError(f"training did not finish within {timeout_s} s")
    finally:
        for p, log, _ in procs:
            if p.poll() is None:  # a peer failed: its partners would wait forever in a collective
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            p.wait()
            time.sleep(0.1)  # let the tee thread drain
            log.close()
    if failed:
        p, rank = failed
        tails = "".join(f"\n--- {f.name} (last lines) ---\n" + "\n".join(f.read_text().splitlines()[-25:])
                        for f in sorted(logs.glob("rank*.log")))
        raise LaunchError(f"{launcher} rank {rank} exited with status {p.returncode}{tails}")


def _tee(stream, log) -> None:
    # Chunks, not lines: the progress bar redraws with carriage returns.
    for raw in iter(lambda: stream.read1(4096), b""):
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        if not log.closed:
            log.write(line)
            log.flush()


# ---------------------------------------------------------------------------------------------
# Ray Train.

def _ray_train_fn(loop_config: dict) -> None:
    import ray.train  # lazy: Ray only for the ray launcher

    os.environ.update(loop_config["env"])
    ctx = ray.train.get_context()
    streaming_env(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ctx.get_local_world_size())
    cfg = from_dict(loop_config["config"])
    resume = loop_config["resume"]
    attempt_marker = Path(cfg.output_dir, f".ray-attempt-{loop_config['token']}")
    if attempt_marker.exists():
        resume = "auto"  # a restart after a lost worker continues from the last checkpoint
    if ctx.get_world_rank() == 0:
        attempt_marker.touch()
    result = run(cfg, resume=resume, force_resume=loop_config["force"])
    ray.train.report({"step": result.step, "finished": result.finished})


def _check_elastic(cfg: TrainConfig, min_workers: int, world: int, workers_per_node: int | None) -> None:
    """The smallest world must split the global batch, and every size Ray Train may restart on must suit
    streaming (``data.num_canonical_nodes``); name the sizes in between that cannot split the batch."""
    if not 1 <= min_workers <= world:
        raise ConfigError(f"min_workers: {min_workers} must be between 1 and the {world} workers")
    batch_split(cfg, min_workers)
    if min_workers < world:
        # Ray Train restarts on whatever fits the free resources, any size in (min, max), packed onto nodes: a
        # size streaming cannot partition would fail every restart, so such a range is refused here.
        if workers_per_node is None:
            raise ConfigError(f"min_workers: an elastic range ({min_workers}..{world} workers) needs "
                              "workers_per_node (--workers-per-node), to check every restart size against "
                              "data.num_canonical_nodes")
        invalid = [w for w in range(min_workers, world + 1)
                   if node_count_problem(cfg.data.num_canonical_nodes, w, min(w, workers_per_node))]
        if invalid:
            shown = ", ".join(map(str, invalid[:8])) + (", ..." if len(invalid) > 8 else "")
            raise ConfigError(
                f"data.num_canonical_nodes: Ray Train may restart on any of {min_workers}..{world} workers, and "
                f"streaming cannot partition the data over {shown} of them ({workers_per_node} per node, "
                f"num_canonical_nodes={cfg.data.num_canonical_nodes}: every node needs the same number of "
                "workers and the node count must divide or be a multiple of num_canonical_nodes); use a fixed "
                "size (no min_workers) or a range whose every size qualifies")
    bad = []
    for w in range(min_workers, world):
        try:
            batch_split(cfg, w)
        except ConfigError:
            bad.append(w)
    if bad:
        print(f"note: a restart on {', '.join(map(str, bad))} workers cannot split train.global_batch_size="
              f"{cfg.train.global_batch_size} and would fail (counting against max_failures)", file=sys.stderr)


def _launch_ray(cfg: TrainConfig, world: int, resume: str, force: bool, opts: RayOptions) -> None:
    # lazy: Ray (seconds to import) only for the ray launcher
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = False
    if not ray.is_initialized():
        kw = dict(opts.extra_init)
        if opts.address:
            kw["address"] = opts.address
        else:
            kw.update(num_cpus=opts.num_cpus, object_store_memory=opts.object_store_memory, include_dashboard=False)
        ray.init(**kw)
        started = True
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if opts.gpus_per_worker == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
    try:
        trainer = TorchTrainer(
            _ray_train_fn,
            train_loop_config={"config": cfg.to_dict(), "resume": resume, "force": force, "env": env,
                               "token": uuid.uuid4().hex[:12]},
            # (min, max): Ray Train restarts a failed group on what is left, down to min_workers.
            scaling_config=ScalingConfig(num_workers=(opts.min_workers, world) if opts.min_workers else world,
                                         use_gpu=opts.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": opts.cpus_per_worker,
                                                               **({"GPU": opts.gpus_per_worker}
                                                                  if opts.gpus_per_worker else {})}),
            torch_config=TorchConfig(backend="nccl" if opts.gpus_per_worker else "gloo"),
            run_config=RunConfig(name=f"{cfg.name}-{uuid.uuid4().hex[:6]}",
                                 storage_path=str(Path(cfg.output_dir, "ray")),
                                 failure_config=FailureConfig(max_failures=opts.max_failures)),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Per-rank entry point of the process launchers.

def _worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train.launcher")
    p.add_argument("config")
    p.add_argument("--resume", default="auto")
    p.add_argument("--force-resume", action="store_true")
    a = p.parse_args(argv)
    run(load_config(a.config, check_data=False), resume=a.resume, force_resume=a.force_resume)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
