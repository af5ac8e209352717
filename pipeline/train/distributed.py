"""The process group and the few collectives the loop needs, behind one small object."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.train.data import streaming_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *_: Any, **__: Any) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    def barrier(self) -> None:
        dist.barrier()

    def print(self, msg: str, *, all_ranks: bool = False) -> None:
        if all_ranks or self.rank == 0:
            prefix = f"[rank {self.rank}] " if all_ranks else ""
            print(f"{prefix}{msg}", flush=True)

    def progress(self, *, total: int, initial: int, enabled: bool):
        if self.rank != 0 or not enabled:
            return _NoBar()
        from tqdm.auto import tqdm  # lazy: rank 0 only

        return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)

    def all_true(self, flag: torch.Tensor) -> bool:
        """True when ``flag`` (a boolean on this rank's device) is true on every rank: one all-reduce, and the
        one host synchronisation of an optimizer step (all ranks must agree to discard a step or go on)."""
        t = flag.detach().to(self.device, torch.int32).reshape(1)
        if self.world_size > 1:  # a collective over one rank is a launch and a wait for nothing
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, on the device: one all-reduce, queued without a host synchronisation."""
        t = values.detach().clone()
        dist.all_reduce(t)
        return t

    def mean(self, values: torch.Tensor) -> list[float]:
        """The mean over ranks of each element of ``values`` (one all-reduce, one host synchronisation)."""
        t = values.detach().to(self.device, torch.float64).clone().reshape(-1)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def gather(self, rows: list) -> list:
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, rows)
        return [r for part in parts for r in part]



def setup_distributed() -> DistContext:
    """Join (or, alone, create) the process group and make the environment agree with it.

    Launchers differ in what they set: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher only
    LOCAL_SIZE, Ray Train its own context. Streaming reads the env, so the env is made complete here.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized() and "RANK" not in os.environ:  # a plain `python` process: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    import deepspeed

    # Adopts a process group created by someone else (Ray Train) or creates it from the env.
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    streaming_env(rank, world, local_rank, local_world)
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(rank, world, local_rank, local_world, device)
