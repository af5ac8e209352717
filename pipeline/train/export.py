"""End-of-training export (rank 0): consolidated fp32 weights, EMA weights, the model config.

The raw weights come from DeepSpeed's own consolidation of the ZeRO shards
(``get_fp32_state_dict_from_zero_checkpoint``), not a hand-written merge; so do the EMA weights,
whose shards the checkpoint holds in the same layout (``{step}/ema``, see ema.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import models
from pipeline.artifacts import RunDir
from pipeline.train.config import Plan, TrainConfig
from pipeline.train.ema import consolidate_ema


def consolidate(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a checkpoint directory ``.../step_XXXXXXXX`` written by any number of ranks."""
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
            for k, v in sd.items()}


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    # clone: safetensors refuses tensors that share storage.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))
    return path


def model_config(config: TrainConfig, plan: Plan, model) -> dict:
    """What rebuilds the model (``pipeline.models.from_model_config``) with the preprocessing's mean and std."""
    return {
        "name": config.model.name,
        "num_classes": plan.num_classes,
        "img_size": config.model.img_size,
        "drop_path_rate": config.model.drop_path_rate,
        "overrides": dict(config.model.overrides),
        "config": models.architecture(model),
        "train_config_hash": config.config_hash,
        "mean": list(config.augment.mean),
        "std": list(config.augment.std),
    }


def export_all(engine, ema, config: TrainConfig, plan: Plan, checkpoint: Path, out: Path, ctx) -> dict:
    """Collective (every rank calls it; rank 0 writes). Returns the paths of what was written."""
    run = RunDir(str(out))
    paths = {"weights": run.join(RunDir.WEIGHTS), "model_config": run.join(RunDir.MODEL_CONFIG),
             "ema_weights": run.join(RunDir.EMA_WEIGHTS) if ema else None}
    if not config.checkpoint.export:
        return {}
    if ctx.rank == 0:
        if config.deepspeed.zero_stage == 0:
            state = {k: v.float() if v.is_floating_point() else v for k, v in engine.module.state_dict().items()}
        else:
            state = consolidate(checkpoint)
        save_safetensors(state, run.local(RunDir.WEIGHTS))
        del state
        if ema:
            save_safetensors(consolidate_ema(checkpoint), run.local(RunDir.EMA_WEIGHTS))
        run.write_json(RunDir.MODEL_CONFIG, model_config(config, plan, engine.module))
    ctx.barrier()
    return paths
