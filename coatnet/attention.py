"""Relative self-attention (the paper's Eq. 3, pre-softmax): softmax(q k^T / sqrt(d) + w[i-j]) v.

``w`` is a trainable per-head table of (2H-1) x (2W-1) scalars, one per 2-D relative offset. The bias
for every pair of positions is gathered from the table in every training forward (so the table gets
its gradient) and may be cached in inference while the table is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The fused CUDA attention kernels want the float mask's row stride to be a multiple of 16 elements;
# otherwise SDPA pads (copies) the mask in every call. Gathering straight into a padded layout makes
# the pad free. On CPU the extra columns are never read.
MASK_ALIGN = 16


def relative_position_index(grid: tuple[int, int], align: int = MASK_ALIGN) -> torch.Tensor:
    """Flat table index for every (query, key) pair, laid out as (N, N_padded) then flattened.

    Entry (p, q) with p=(i, j), q=(i', j') is (i-i'+H-1) * (2W-1) + (j-j'+W-1); pad columns point to 0.
    """
    h, w = grid
    n = h * w
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    idx = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    n_pad = -(-n // align) * align
    if n_pad != n:
        idx = F.pad(idx, (0, n_pad - n))
    return idx.flatten().to(torch.int32)  # int32 halves the buffer of the largest grids


class RelativePositionBias(nn.Module):
    """Per-head (2H-1)x(2W-1) table and its gather into an (heads, N, N) float attention mask."""

    def __init__(self, num_heads: int, grid: tuple[int, int], cache: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.grid = tuple(grid)
        h, w = self.grid
        self.table = nn.Parameter(torch.empty(num_heads, 2 * h - 1, 2 * w - 1))
        # Not persistent: derived from the grid, so checkpoints stay resolution-agnostic.
        self.register_buffer("index", torch.empty(0, dtype=torch.int32), persistent=False)
        self.cache_enabled = cache
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self.reset_index()

    def reset_index(self) -> None:
        """(Re)build the gather index; needed after materialising a meta-device model (``to_empty``)."""
        device = self.table.device
        self.index = relative_position_index(self.grid).to(device)
        self._cache = None

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def gather(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (heads, N, N) bias; its last dim is contiguous and its row stride MASK_ALIGN-aligned."""
        n = self.num_positions
        table = self.table if dtype is None else self.table.to(dtype)
        bias = table.flatten(1).index_select(1, self.index)
        return bias.view(self.num_heads, n, -1)[:, :, :n]

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if (
            self.training
            or not self.cache_enabled
            or (torch.is_grad_enabled() and self.table.requires_grad)
            or torch.compiler.is_compiling()
        ):
            return self.gather(dtype)
        # _version moves on every in-place update (optimizer step, load_state_dict's copy_);
        # data_ptr/device/dtype move on .to(); train() clears the cache outright.
        t = self.table
        # inference-mode tensors must not leak into autograd-recording code outside inference mode
        key = (t._version, t.data_ptr(), t.device, t.dtype, dtype, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.gather(dtype))
        return self._cache[1]

    def train(self, mode: bool = True) -> RelativePositionBias:
        if mode:  # training never reads the cache; an eval() call keeps it (the key still guards it)
            self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, grid={self.grid}, table={tuple(self.table.shape[1:])}"


class RelativeAttention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens with the relative bias as a float mask."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        head_dim: int,
        grid: tuple[int, int],
        impl: str = "sdpa",
        cache_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = dim_out // head_dim
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.impl = impl
        self.qkv = nn.Linear(dim_in, 3 * dim_out)
        self.rel_bias = RelativePositionBias(self.num_heads, grid, cache=cache_bias)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if n != self.rel_bias.num_positions:
            raise ValueError(
                f"attention built for a {self.rel_bias.grid} grid ({self.rel_bias.num_positions} tokens) got "
                f"{n} tokens: create the model with the input's img_size (tables adapt on load)"
            )
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_bias(q.dtype)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = eager_attention(q, k, v, bias, self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference path: explicit scores, bias add and softmax (in fp32 for low-precision inputs)."""
    scores = (q * scale) @ k.transpose(-2, -1) + bias
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
