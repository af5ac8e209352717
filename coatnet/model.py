"""The CoAtNet network: stem, four stages of blocks, pooled classifier head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from coatnet.attention import RelativeAttention, RelativePositionBias
from coatnet.blocks import MBConv, Stem, TransformerBlock
from coatnet.config import CoAtNetConfig
from coatnet.layers import init_weights
from coatnet.state_dict import HEAD_WEIGHT, TABLE_SUFFIX, adapt_to_shapes, param_shapes, strip_wrapper_prefix


class Stage(nn.Module):
    """A run of blocks; optionally recomputes each block in backward (activation checkpointing)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> Linear (no class token, as in the paper)."""

    def __init__(self, dim: int, num_classes: int, cfg: CoAtNetConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=cfg.ln_eps) if cfg.head_norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)


def build_stages(cfg: CoAtNetConfig) -> list[Stage]:
    """Blocks of S1..S4 with the stochastic-depth rate ramped linearly over all of them."""
    total = cfg.total_blocks()
    rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    sizes = cfg.feature_sizes()
    dim, k, stages = cfg.stem_width, 0, []
    for s, (depth, width, kind) in enumerate(zip(cfg.depths, cfg.widths, cfg.block_types)):
        blocks: list[nn.Module] = []
        stride = 2
        if s == 2 and cfg.s3_mbconv_depth:
            for _ in range(cfg.s3_mbconv_depth):
                blocks.append(MBConv(dim, cfg.s3_mbconv_width, stride, cfg, rates[k]))
                dim, stride, k = cfg.s3_mbconv_width, 1, k + 1
        for _ in range(depth):
            if kind == "mbconv":
                blocks.append(MBConv(dim, width, stride, cfg, rates[k]))
            else:
                blocks.append(TransformerBlock(dim, width, stride, sizes[s + 1], cfg, rates[k]))
            dim, stride, k = width, 1, k + 1
        stages.append(Stage(blocks))
    return stages


class CoAtNet(nn.Module):
    """CoAtNet (Dai et al. 2021). Build with ``coatnet.create_model``; ``config`` says exactly what was built."""

    def __init__(self, config: CoAtNetConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = config.widths[-1]
        self.channels_last = config.channels_last
        self.stem = Stem(config.in_chans, config.stem_width, config)
        self.stages = nn.ModuleList(build_stages(config))
        self.head = ClassifierHead(self.num_features, config.num_classes, config)
        self.init_weights()
        # Any state dict loaded into this model first goes through adapt_state_dict (table resizing).
        self.register_load_state_dict_pre_hook(_adapt_on_load)

    # --- construction helpers -----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and derived buffer (also materialises a model made on meta + to_empty).

        Everything goes through ``Module.apply``, one module at a time: frameworks that build a model
        partitioned (DeepSpeed's ``zero.Init``) gather each module's parameters around ``apply`` calls, so
        the partitioned build draws the same numbers in the same order as an ordinary one. The tables are
        leaves, so visiting them with ``apply`` keeps the order of ``modules()``.
        """
        std = self.config.init_std
        xavier = frozenset(id(m) for block in self.modules() if isinstance(block, TransformerBlock)
                           for m in block.modules() if isinstance(m, nn.Linear)) \
            if self.config.transformer_init == "xavier_uniform" else frozenset()
        self.apply(lambda m: init_weights(m, std, xavier))
        self.apply(lambda m: _init_table(m, std))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0 = features only)."""
        ref = self.head.norm.weight if isinstance(self.head.norm, nn.LayerNorm) else self.stem.conv2.weight
        fc: nn.Module = nn.Identity()
        if num_classes > 0:
            fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            init_weights(fc, self.config.init_std)
        self.head.fc = fc
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exempt from weight decay: norms, biases, relative-position tables."""
        # ds_shape: a ZeRO-3 partitioned parameter is an empty 1-D tensor that keeps its real shape there.
        return {n for n, p in self.named_parameters()
                if len(getattr(p, "ds_shape", p.shape)) <= 1 or n.endswith(TABLE_SUFFIX)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_attn_impl(self, impl: str) -> None:
        """'sdpa' (fused, default) or 'eager' (reference); same parameters, same function."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {impl!r}")
        self.config = self.config.replace(attn_impl=impl)
        for m in self.modules():
            if isinstance(m, RelativeAttention):
                m.impl = impl

    def set_bias_cache(self, enable: bool) -> None:
        """Enable or disable reusing the gathered relative bias in inference."""
        self.config = self.config.replace(cache_bias=enable)
        for m in self.modules():
            if isinstance(m, RelativePositionBias):
                m.cache_enabled = enable
                m._cache = None

    # --- forward ------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected (B, {self.config.in_chans}, H, W) input, got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of S0..S4, each (B, C, H, W)."""
        x = self.stem(self._prepare(x))
        outs = [x]
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C, H/32, W/32), before pooling."""
        x = self.stem(self._prepare(x))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_table(module: nn.Module, std: float) -> None:
    if isinstance(module, RelativePositionBias):
        nn.init.normal_(module.table, std=std)
        module.reset_index()


def _adapt_on_load(module: CoAtNet, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: resize relative-position tables to this model's grids, in place."""
    error_msgs = args[-1]
    sub = strip_wrapper_prefix({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    for k in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[k]
    try:
        sub = adapt_to_shapes(sub, param_shapes(module), module.config, module.num_classes)
    except ValueError as e:
        error_msgs.append(str(e))
    w = sub.get(HEAD_WEIGHT)
    if w is not None and module.num_classes > 0 and w.shape[0] != module.num_classes:
        error_msgs.append(
            f"checkpoint classifier has {w.shape[0]} classes, this model {module.num_classes}: "
            "say what to do with the head, e.g. coatnet.load_pretrained(model, sd, head='reset') "
            "or head='select' with class_index=[...]"
        )
    state_dict.update({prefix + k: v for k, v in sub.items()})
