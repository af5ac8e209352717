"""An fp32 exponential moving average of the weights, sharded like the optimizer (DeepSpeed keeps none).

Each rank averages its own partition of the fp32 master weights, the tensors DeepSpeed's optimizer
steps: ZeRO-3's ``fp32_partitioned_groups_flat``, ZeRO-1/2's ``single_partition_of_fp32_groups``.
The EMA is a list of flat tensors shaped exactly like them, so an update is one fused
``lerp`` per group, with no collective and no gather (P/N elements per rank), and the average is
of the fp32 masters, not of their bf16 copies. Without ZeRO (stage 0) every rank holds the whole
model, and so the whole EMA, of the module's parameters.

Checkpoint layout (``{step_dir}/ema/``): every rank writes its partition as the
``*_optim_states.pt`` file DeepSpeed itself would write for fp32 master weights of that value, and rank
0 writes the model-states metadata (parameter shapes, buffers) without the weights. That directory
is a DeepSpeed ZeRO checkpoint of the EMA weights: DeepSpeed's own ``zero_to_fp32`` consolidates it
(``get_fp32_state_dict_from_zero_checkpoint(step_dir, tag="ema")``, or ``python zero_to_fp32.py
STEP_DIR OUT --tag ema``), exactly as it consolidates the raw weights. Buffers (BatchNorm statistics)
are not averaged: the EMA carries the model's current ones, as timm's ModelEmaV3 does by default.

On another world size the EMA is read back from the universal checkpoint that checkpoint.py makes:
one full fp32 tensor per parameter (``universal/zero/<name>/ema.pt``, next to DeepSpeed's ``fp32.pt``),
of which each rank takes its new partition.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

EMA_DIR = "ema"
UNIVERSAL_EMA_FILE = "ema.pt"  # beside DeepSpeed's fp32.pt / exp_avg.pt in universal/zero/<param>/
_FULL_STATE = "ema_state.pt"  # stage 0: the whole EMA, written by rank 0
_UNIVERSAL_META = "ema.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ShardedEma:
    """fp32 EMA of this rank's partition of the master weights: ``update()`` after each optimizer step."""

    def __init__(self, engine, decay: float, device: str | torch.device | None = None) -> None:
        self.engine = engine
        self.decay = decay
        self.num_updates = 0
        self.stage = int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0
        opt = engine.optimizer
        if self.stage >= 1 and getattr(opt, "swap_optimizer", False):
            raise ValueError("ema.decay with the optimizer state on NVMe (ZeRO-Infinity) is not supported: the fp32 "
                             "master partitions are not resident; offload the optimizer to CPU instead")
        masters = self._masters()
        self.device = torch.device(device) if device is not None else masters[0].device
        self.shadow: list[torch.Tensor] = [m.detach().to(self.device, torch.float32, copy=True) for m in masters]

    # -- the master weights it follows ----------------------------------------------------------------
    def _masters(self) -> list[torch.Tensor]:
        # Looked up at every use: loading a checkpoint may give DeepSpeed new tensors.
        opt = self.engine.optimizer
        if self.stage == 3:
            return list(opt.fp32_partitioned_groups_flat)
        if self.stage in (1, 2):
            return list(opt.single_partition_of_fp32_groups)
        return [p.detach() for p in self._params()]

    def _params(self) -> list[nn.Parameter]:
        return [p for _, p in self.engine.module.named_parameters()]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * master, for this rank's partition; no communication."""
        # Device to host is copied blocking (a non-blocking one may not have landed when lerp reads it): with
        # ema.device=cpu that is one host synchronisation per EMA update, the price of the GPU memory it saves.
        masters = [m.to(self.device, torch.float32, non_blocking=self.device.type != "cpu") for m in self._masters()]
        torch._foreach_lerp_(self.shadow, masters, 1.0 - self.decay)
        self.num_updates += 1

    @property
    def numel(self) -> int:
        """Elements this rank keeps (its partition, padding included)."""
        return sum(t.numel() for t in self.shadow)

    # -- in-memory state (same world size) --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "stage": self.stage,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "shadow": [t.detach().cpu() for t in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(
                a.numel() < b.numel() for a, b in zip(self.shadow, state["shadow"])):
            raise ValueError(f"EMA state of {len(state['shadow'])} partitions "
                             f"({[t.numel() for t in state['shadow']]} elements) does not fit this rank's "
                             f"{[t.numel() for t in self.shadow]}; another world size or model?")
        for dst, src in zip(self.shadow, state["shadow"]):
            dst.zero_()
            dst.view(-1)[: src.numel()].copy_(src.to(dst.device).reshape(-1))
        self.num_updates = int(state["num_updates"])

    # -- checkpoint layout (DeepSpeed's, see the module docstring) --------------------------------------
    def save(self, step_dir: str | Path) -> Path:
        """Every rank writes its partition into ``{step_dir}/ema``; call after ``engine.save_checkpoint``."""
        # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
        from deepspeed.checkpoint.constants import (
            DS_VERSION,
            FP32_FLAT_GROUPS,
            OPTIMIZER_STATE_DICT,
            PARAM_ALIGNMENT_PADDINGS,
            PARTITION_COUNT,
            SINGLE_PARTITION_OF_FP32_GROUPS,
            ZERO_STAGE,
        )

        # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
        from deepspeed.git_version_info import version

        out = Path(step_dir, EMA_DIR)
        out.mkdir(parents=True, exist_ok=True)
        rank = _rank()
        meta = {"decay": self.decay, "num_updates": self.num_updates}
        if self.stage == 0:
            if rank == 0:
                names = [n for n, _ in self.engine.module.named_parameters()]
                torch.save({**meta, "state": dict(zip(names, (t.cpu() for t in self.shadow)))}, out / _FULL_STATE)
            return out
        opt = self.engine.optimizer
        flats = [t.detach().cpu() for t in self.shadow]
        osd: dict = {ZERO_STAGE: self.stage, PARTITION_COUNT: opt.partition_count}
        if self.stage == 3:
            osd[FP32_FLAT_GROUPS] = flats
        else:
            # As ZeRO-1/2 save their own fp32 partitions: without the alignment padding at the end.
            osd[SINGLE_PARTITION_OF_FP32_GROUPS] = [t[: t.numel() - pad] for t, pad in zip(flats, opt.groups_padding)]
            osd[PARAM_ALIGNMENT_PADDINGS] = getattr(opt, "round_robin_bit16_padding", None)
        torch.save({OPTIMIZER_STATE_DICT: osd, DS_VERSION: version, "ema": meta},
                   out / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if rank == 0:
            _write_model_states_metadata(Path(step_dir), out, self.stage)
        return out

    @torch.no_grad()
    def load(self, step_dir: str | Path) -> None:
        """This rank's partition from ``{step_dir}/ema`` (written by the same world size)."""
        # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
        from deepspeed.checkpoint.constants import (
            FP32_FLAT_GROUPS,
            OPTIMIZER_STATE_DICT,
            PARTITION_COUNT,
            SINGLE_PARTITION_OF_FP32_GROUPS,
        )

        d = Path(step_dir, EMA_DIR)
        if self.stage == 0:
            state = torch.load(d / _FULL_STATE, map_location="cpu", weights_only=False)
            self._fill(lambda name: state["state"][name])
            self.num_updates = int(state["num_updates"])
            return
        sd = torch.load(d / f"zero_pp_rank_{_rank()}_mp_rank_00_optim_states.pt", map_location="cpu",
                        weights_only=False)
        osd = sd[OPTIMIZER_STATE_DICT]
        world = dist.get_world_size() if dist.is_initialized() else 1
        if max(_as_list(osd[PARTITION_COUNT])) != world:
            raise ValueError(f"{d} holds an EMA partitioned over {osd[PARTITION_COUNT]} ranks, this run has {world}: "
                             "load it from the universal checkpoint (load_universal)")
        key = FP32_FLAT_GROUPS if self.stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS
        self.load_state_dict({"shadow": osd[key], "num_updates": sd["ema"]["num_updates"]})

    @torch.no_grad()
    def load_universal(self, universal_dir: str | Path) -> None:
        """This rank's partition, cut from the full per-parameter tensors of a universal checkpoint
        (``write_universal``), one parameter at a time."""
        # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
        from deepspeed.checkpoint.constants import PARAM

        universal_dir = Path(universal_dir)
        if self.stage == 0:  # the whole EMA on every rank: nothing to re-partition
            self.load(universal_dir.parent)
            return
        zero = universal_dir / "zero"
        self._fill(lambda name: torch.load(zero / name / UNIVERSAL_EMA_FILE, map_location="cpu",
                                           weights_only=False)[PARAM])
        self.num_updates = int(json.loads((universal_dir / _UNIVERSAL_META).read_text())["num_updates"])

    def _fill(self, full_tensor) -> None:
        """Set the shadow from full fp32 parameters (``full_tensor(name)``), one parameter at a time."""
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        for t in self.shadow:
            t.zero_()
        if self.stage == 0:
            for t, (name, _) in zip(self.shadow, self.engine.module.named_parameters()):
                t.copy_(full_tensor(name).reshape(t.shape))
            return
        opt = self.engine.optimizer
        if self.stage == 3:
            # A parameter's partition on rank r is its flattened elements [r*n, (r+1)*n), zero-padded; the
            # partitions of a sub-group lie back to back in its flat tensor (DeepSpeed's grad_position).
            rank = dist.get_rank(group=opt.dp_process_group)
            for flat, group in zip(self.shadow, opt.fp16_groups):
                offset = 0
                for p in group:
                    n = p.partition_numel()
                    part = full_tensor(names[id(p)]).reshape(-1)[rank * n:(rank + 1) * n]
                    flat[offset:offset + part.numel()].copy_(part)
                    offset += n
            return
        # ZeRO-1/2: each parameter's fragment on this rank, as DeepSpeed links it (param._hp_mapping).
        for flat, group in zip(self.shadow, opt.bit16_groups):
            for p in group:
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    continue
                full = full_tensor(names[id(p)]).reshape(-1)
                flat.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel).copy_(
                    full.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel))


def _as_list(x) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]


def _write_model_states_metadata(step_dir: Path, out: Path, stage: int) -> None:
    """DeepSpeed's model-states file of rank 0 without its weights: what zero_to_fp32 needs (shapes, buffers)."""
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    from deepspeed.checkpoint.constants import BUFFER_NAMES

    name = "mp_rank_00_model_states.pt" if stage <= 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    src = step_dir / name
    if not src.is_file():
        raise FileNotFoundError(f"{src}: the EMA is saved after the engine's checkpoint (DeepSpeed writes this file)")
    sd = torch.load(src, map_location="cpu", mmap=True, weights_only=False)
    buffers = set(sd.get(BUFFER_NAMES, ()))
    keep = {k: v for k, v in sd.items() if k not in ("module", "optimizer")}
    keep["module"] = {k: v.clone() for k, v in (sd.get("module") or {}).items() if k in buffers}
    tmp = out / f".{name}.tmp"
    torch.save(keep, tmp)
    tmp.replace(out / name)


def write_universal(step_dir: str | Path, universal_dir: str | Path) -> None:
    """Add the EMA of ``step_dir`` to its universal checkpoint: ``zero/<param>/ema.pt`` per parameter.

    DeepSpeed's zero_to_fp32 reads the EMA shards (lazily under ZeRO-3: one parameter in memory at a time).
    """
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    from deepspeed.checkpoint.constants import PARAM
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir, universal_dir = Path(step_dir), Path(universal_dir)
    d = step_dir / EMA_DIR
    if (d / _FULL_STATE).is_file():
        return  # stage 0: not partitioned
    rank0 = torch.load(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", mmap=True,
                       weights_only=False)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=EMA_DIR, lazy_mode=True)
    zero = universal_dir / "zero"
    for name, t in lazy.items():
        if (zero / name).is_dir() and t.dtype.is_floating_point:
            torch.save({PARAM: t.contiguous().float().clone()}, zero / name / UNIVERSAL_EMA_FILE)
    (universal_dir / _UNIVERSAL_META).write_text(json.dumps(rank0["ema"]))


def consolidate_ema(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint as one fp32 state dict (DeepSpeed's zero_to_fp32 on its layout)."""
    step_dir = Path(step_dir)
    d = step_dir / EMA_DIR
    if (d / _FULL_STATE).is_file():
        state = torch.load(d / _FULL_STATE, map_location="cpu", weights_only=False)["state"]
        buffers = _stage0_buffers(step_dir)
        return {**buffers, **{k: v.float().contiguous() for k, v in state.items()}}
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=EMA_DIR)
    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
            for k, v in sd.items()}


def _stage0_buffers(step_dir: Path) -> dict[str, torch.Tensor]:
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    from deepspeed.checkpoint.constants import BUFFER_NAMES

    f = step_dir / "mp_rank_00_model_states.pt"
    if not f.is_file():
        return {}
    sd = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
    names = set(sd.get(BUFFER_NAMES, ()))
    return {k: v.clone() for k, v in sd["module"].items() if k in names}
