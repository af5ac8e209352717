"""The model and its DeepSpeed engine, built from the recipe.

ZeRO stage, offload, precision and clipping come from the config; the optimizer is DeepSpeed's
AdamW (``torch_adam`` on CPU, where the fused CUDA kernel does not exist) over the parameter
groups of optim.py, stepped together with the schedule of optim.py.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pipeline.train.config import Plan, TrainConfig
from pipeline.train.optim import lr_scheduler_factory, param_groups


def on_gpu() -> bool:
    return torch.cuda.is_available()


def precision(cfg: TrainConfig) -> str:
    if cfg.deepspeed.precision == "auto":
        return "bf16" if on_gpu() else "fp32"
    return cfg.deepspeed.precision


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: TrainConfig, plan: Plan) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu()}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # DeepSpeed's FusedAdam needs CUDA; torch's AdamW runs everywhere.
                "torch_adam": not on_gpu(),
            },
        },
        "bf16": {"enabled": precision(cfg) == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 0:
        config.pop("zero_optimization")
    return _merge(config, ds.extra)


def build_model(cfg: TrainConfig, plan: Plan) -> nn.Module:
    import coatnet

    m = cfg.model
    model = coatnet.create_model(m.name, num_classes=plan.num_classes, img_size=m.img_size,
                                 drop_path_rate=m.drop_path_rate, **m.overrides)
    if m.init_weights:
        load_init_weights(model, m.init_weights)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_init_weights(model: nn.Module, uri: str) -> None:
    """Strict load of a safetensors state dict; the model's own hook adapts relative-position tables."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from pipeline import storage

    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.download_file(uri, Path(tmp, "init.safetensors"))
            state = load_file(str(local))
    else:
        state = load_file(uri)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"model.init_weights {uri} does not fit {type(model).__name__}: {e}") from e


def initialize(model: nn.Module, cfg: TrainConfig, plan: Plan):
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config(cfg, plan),
        lr_scheduler=lr_scheduler_factory(total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                                          optim=cfg.optim, schedule=cfg.schedule),
    )
    return engine, scheduler


def input_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if precision(cfg) == "bf16" else torch.float32
