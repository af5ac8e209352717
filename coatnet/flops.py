"""Analytic parameter and multiply-add counts, straight from a config (nothing is built or allocated).

MACs count convolutions, linear layers and the two attention matmuls (QK^T and AV), which is how the
paper's "FLOPs" behave; norms, activations, pooling, SE's global pool, the softmax and the bias add
are left out (each is O(activations), well under 1% here). Training costs about 3x the forward, so
achieved FLOP/s = 6 x MACs x images/s.
"""

from __future__ import annotations

from coatnet.config import CoAtNetConfig
from coatnet.registry import get_config


def _mbconv(cfg: CoAtNetConfig, cin: int, cout: int, stride: int, hin: int, win: int) -> tuple[int, int]:
    mid = int(round(cout * cfg.expand_ratio))
    rd = max(1, int(round(cout * cfg.se_ratio)))
    ho, wo = ((hin + 1) // 2, (win + 1) // 2) if stride == 2 else (hin, win)
    pin, pout = hin * win, ho * wo
    params = 2 * cin + cin * mid + 2 * mid + 9 * mid + 2 * mid + (mid * rd + rd + rd * mid + mid) + mid * cout + cout
    expand_at = pout if cfg.downsample == "eq5" else pin
    macs = cin * mid * expand_at + 9 * mid * pout + 2 * mid * rd + mid * cout * pout
    if cin != cout:
        params += cin * cout + cout
        macs += cin * cout * pout
    return params, macs


def _transformer(cfg: CoAtNetConfig, cin: int, cout: int, stride: int, hin: int, win: int) -> tuple[int, int]:
    ho, wo = ((hin + 1) // 2, (win + 1) // 2) if stride == 2 else (hin, win)
    n = ho * wo
    heads = cout // cfg.head_dim
    hidden = int(round(cout * cfg.ffn_ratio))
    params = 2 * cin + (cin * 3 * cout + 3 * cout) + (cout * cout + cout)
    params += heads * (2 * ho - 1) * (2 * wo - 1)
    params += 2 * cout + (cout * hidden + hidden) + (hidden * cout + cout)
    macs = n * (cin * 3 * cout + cout * cout) + 2 * n * n * cout + 2 * n * cout * hidden
    if cin != cout:
        params += cin * cout + cout
        macs += n * cin * cout
    return params, macs


def count_config(cfg: CoAtNetConfig) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of ``cfg`` at ``cfg.img_size``."""
    h, w = cfg.img_size
    s0 = cfg.stem_width
    h, w = (h + 1) // 2, (w + 1) // 2
    params = cfg.in_chans * 9 * s0 + 2 * s0 + s0 * 9 * s0 + s0
    macs = (cfg.in_chans * 9 * s0 + s0 * 9 * s0) * h * w
    dim = s0
    for s, (depth, width, kind) in enumerate(zip(cfg.depths, cfg.widths, cfg.block_types)):
        specs = []
        if s == 2 and cfg.s3_mbconv_depth:
            specs += [("mbconv", cfg.s3_mbconv_width)] * cfg.s3_mbconv_depth
        specs += [(kind, width)] * depth
        for i, (k, cout) in enumerate(specs):
            stride = 2 if i == 0 else 1
            p, m = (_mbconv if k == "mbconv" else _transformer)(cfg, dim, cout, stride, h, w)
            params, macs, dim = params + p, macs + m, cout
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
    if cfg.head_norm:
        params += 2 * dim
    if cfg.num_classes > 0:
        params += dim * cfg.num_classes + cfg.num_classes
        macs += dim * cfg.num_classes
    return params, macs


def count(
    name_or_config: str | CoAtNetConfig,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of a variant, at ``img_size`` (default: the config's)."""
    if isinstance(name_or_config, str):
        cfg = get_config(name_or_config)
    else:
        cfg = name_or_config
    changes: dict = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if num_classes is not None:
        changes["num_classes"] = num_classes
    return count_config(cfg.replace(**changes) if changes else cfg)
