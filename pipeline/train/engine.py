"""The model and its DeepSpeed engine, built from the recipe.

ZeRO stage, offload, precision and clipping come from the config; the optimizer is DeepSpeed's
AdamW (``torch_adam`` on CPU, where the fused CUDA kernel does not exist) over the parameter
groups of optim.py, stepped together with the schedule of optim.py.

Under ZeRO-3 the model is built inside ``deepspeed.zero.Init``: each module's parameters are
partitioned as soon as its constructor returns, so no rank ever holds the whole model (CoAtNet-7
is 9.7 GB of fp32). The model initialises itself through ``Module.apply``, which zero.Init wraps
to gather one module at a time, so the partitioned build draws the same numbers in the same order
as an unpartitioned one: same seed, same weights.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from coatnet.adapt import strip_wrapper_prefix
from pipeline import models, storage
from pipeline.artifacts import RunDir
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


def optimizer_choice(cfg: TrainConfig) -> tuple[str, str]:
    """(AdamW implementation, why): the dry run prints both; the engine builds exactly that one."""
    impl = cfg.optim.impl
    if impl != "auto":
        return impl, "optim.impl in the recipe"
    if on_gpu():
        # DeepSpeed 0.19.8's FusedAdam JIT build fails on Hopper (sm_90a): "invalid literal for int() with
        # base 10: '0a'"; torch's fused AdamW is one multi-tensor kernel too and needs no build.
        return "torch_fused", ("CUDA: torch's fused AdamW (DeepSpeed's FusedAdam JIT build fails on sm_90a with "
                               "\"invalid literal for int() with base 10: '0a'\")")
    return "torch", "CPU: no fused kernel exists there"


def zero_layout(cfg: TrainConfig, plan: Plan) -> tuple[dict[str, bool], str]:
    """(the ZeRO gradient layout for this world size, why); ``deepspeed.extra`` still overrides it."""
    if plan.world_size == 1:
        # Profiled (benchmarks/train_overhead.py --zero 2): contiguous_gradients copies every gradient into a
        # flat buffer as backward produces it, which only pays when other ranks read slices of that buffer.
        return ({"contiguous_gradients": False, "overlap_comm": False},
                "one rank: no gradient buffer to keep contiguous for a reduce-scatter, no communication to overlap")
    return ({"contiguous_gradients": True, "overlap_comm": on_gpu()},
            "several ranks: contiguous gradient buckets for the reduce-scatter"
            + (", overlapped with backward on CUDA" if on_gpu() else " (gloo: no overlap on CPU)"))


def compile_choice(cfg: TrainConfig) -> tuple[bool, str]:
    """(compile the repeated blocks, why)."""
    c = cfg.model.compile
    if c != "auto":
        return c, "model.compile in the recipe"
    if not on_gpu():
        return False, "CPU: compile time outweighs the step (set model.compile: true to force)"
    if partitioned(cfg):
        return False, "ZeRO-3: its per-module parameter gathers break the compiled graphs"
    return True, "CUDA with ZeRO 0-2: regional compile, each distinct block compiled once"


def compile_regions(model: nn.Module) -> int:
    """Compile each block of every ``blocks`` list in place (``Module.compile``: names and state dict unchanged).

    Identical blocks share one compiled code object (parameters are graph inputs), so the first step compiles
    once per distinct block shape, not once per block nor the whole model at once. Returns the blocks compiled;
    a model without ``blocks`` lists is compiled whole.
    """
    n = 0
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            for block in blocks:
                block.compile()
                n += 1
    if n == 0:
        model.compile()
    return n


def _adamw(impl: str) -> dict[str, Any]:
    # torch_adam: DeepSpeed builds torch.optim.AdamW with the remaining params (fused passes through).
    return {"deepspeed_fused": {"torch_adam": False}, "torch_fused": {"torch_adam": True, "fused": True},
            "torch": {"torch_adam": True}}[impl]


def ds_config(cfg: TrainConfig, plan: Plan) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, **zero_layout(cfg, plan)[0]}
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
                "weight_decay": cfg.optim.weight_decay, **_adamw(optimizer_choice(cfg)[0]),
            },
        },
        "bf16": {"enabled": precision(cfg) == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 0:
        config.pop("zero_optimization")
    return _merge(config, ds.extra)


def partitioned(cfg: TrainConfig) -> bool:
    return cfg.deepspeed.zero_stage == 3


def build_model(cfg: TrainConfig, plan: Plan) -> nn.Module:
    """The recipe's model, partitioned across the ranks under ZeRO-3 (collective then), whole otherwise.

    Seed the global RNG first: every rank draws the same initial weights.
    """
    m = cfg.model
    inside = models.builds_partitioned(m.name)
    with _construction(cfg, plan) if inside else contextlib.nullcontext():
        model = models.create_model(m.name, num_classes=plan.num_classes, img_size=m.img_size,
                                    drop_path_rate=m.drop_path_rate, overrides=m.overrides)
    if partitioned(cfg) and not inside:
        # Built whole (its initialisation cannot run on partitions), then partitioned: same weights as ZeRO-1/2.
        _partition(model, cfg, plan)
    if m.init_weights:
        load_init_weights(model, m.init_weights)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if compile_choice(cfg)[0]:
        compile_regions(model)
    return model


def _construction(cfg: TrainConfig, plan: Plan):
    if not partitioned(cfg):
        return contextlib.nullcontext()
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    import deepspeed

    # The engine's own config: same dtype, same parameter offload (partitions straight to host memory).
    return deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, plan))


def _partition(model: nn.Module, cfg: TrainConfig, plan: Plan) -> None:
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config(cfg, plan))


def load_init_weights(model: nn.Module, uri: str) -> None:
    """Strict load of a safetensors state dict; relative-position tables are adapted to the model's grids.

    A ZeRO-3 model is loaded one module at a time: its parameters are gathered, rank 0 copies the
    file's tensors in (read lazily, one tensor at a time) and DeepSpeed re-partitions them from rank 0.
    """
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.download_file(uri, Path(tmp, RunDir.INIT_WEIGHTS))
            _load_init_file(model, str(local), uri)
    else:
        _load_init_file(model, uri, uri)


def _load_init_file(model: nn.Module, path: str, uri: str) -> None:
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        try:
            model.load_state_dict(load_file(path), strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"model.init_weights {uri} does not fit {type(model).__name__}: {e}") from e
        return
    with safe_open(path, framework="pt") as f:
        _load_partitioned(model, f, uri)


@torch.no_grad()
def _load_partitioned(model: nn.Module, f, uri: str) -> None:
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    import deepspeed
    import torch.distributed as dist

    names = strip_wrapper_prefix({k: k for k in f.keys()})  # our name -> the file's name
    expected = set(model.state_dict(keep_vars=True))  # keep_vars: no gather, names only
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        raise RuntimeError(f"model.init_weights {uri} does not fit {type(model).__name__}: missing keys "
                           f"{missing[:10]}, unexpected keys {unexpected[:10]}")

    def tensor(name: str, shape: torch.Size) -> torch.Tensor:
        t = f.get_tensor(names[name])
        if tuple(t.shape) != tuple(shape):
            # relative-position tables: resized to this grid (a CoAtNet's; another model's: a ValueError)
            t = models.adapt_state_dict({name: t}, model, {name: tuple(shape)})[name]
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"model.init_weights {uri} does not fit {type(model).__name__}: {name} has shape "
                               f"{tuple(t.shape)} in the file, {tuple(shape)} in the model")
        return t

    rank = dist.get_rank()
    for prefix, module in model.named_modules():
        params = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    for name, p in params:
                        p.data.copy_(tensor(name, p.shape))
        for n, b in module.named_buffers(recurse=False):
            name = f"{prefix}.{n}" if prefix else n
            if name in expected:
                b.copy_(tensor(name, b.shape))


def initialize(model: nn.Module, cfg: TrainConfig, plan: Plan, *, load_universal: bool = False):
    """The DeepSpeed engine; ``load_universal``: the run resumes from a universal checkpoint (another world size)."""
    # lazy: DeepSpeed picks its accelerator on import, so only after setup_distributed set DS_ACCELERATOR
    import deepspeed

    config = ds_config(cfg, plan)
    if load_universal:
        config = _merge(config, {"checkpoint": {"load_universal": True}})
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=config,
        lr_scheduler=lr_scheduler_factory(total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                                          optim=cfg.optim, schedule=cfg.schedule),
    )
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        # Without ZeRO, DeepSpeed's backward all-reduces the gradients even over a world of one: it flattens every
        # gradient into a bucket, reduces it with itself and copies it back (buffered_allreduce_fallback), a
        # tenth of a small model's CPU step (benchmarks/train_overhead.py --zero 0). Over one rank the reduce is
        # the identity; ZeRO 1-3 keep theirs, since their optimizers read the reduced partitions.
        engine.enable_backward_allreduce = False
    if not engine.zero_optimization() and engine.mpu is None:
        # DeepSpeed's fp32 clipping without ZeRO takes one norm per parameter in a Python loop, then all-reduces
        # the total for MoE (it has none here: after the gradient all-reduce every rank holds the same gradients).
        # torch's is the same global L2 clip with one multi-tensor norm: 2 of a small model's 30 ms CPU step.
        clip = engine.gradient_clipping()
        engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip,
                                                                             foreach=True)
    return engine, scheduler


def input_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if precision(cfg) == "bf16" else torch.float32
