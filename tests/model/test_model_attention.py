"""Relative attention: the gather, its gradient, and the fused path against the reference path."""

from __future__ import annotations

import itertools

import pytest
import torch

import coatnet
from coatnet.attention import RelativeAttention, RelativePositionBias, eager_attention


@pytest.mark.parametrize("grid", [(3, 4), (5, 5), (1, 1)])
def test_gathered_bias_equals_table_at_relative_offset(grid: tuple[int, int]) -> None:
    h, w = grid
    rpb = RelativePositionBias(num_heads=3, grid=grid)
    torch.nn.init.normal_(rpb.table)
    bias = rpb.gather()
    assert bias.shape == (3, h * w, h * w)
    for (i, j), (k, m) in itertools.product(itertools.product(range(h), range(w)), repeat=2):
        p, q = i * w + j, k * w + m
        torch.testing.assert_close(bias[:, p, q], rpb.table[:, i - k + h - 1, j - m + w - 1], rtol=0, atol=0)


def test_gathered_bias_row_stride_is_aligned_for_fused_kernels() -> None:
    bias = RelativePositionBias(2, (14, 14)).gather()  # N = 196, not a multiple of 16
    assert bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0 and bias.stride(0) % 16 == 0


def test_table_receives_gradient_in_training_and_in_eval_with_grad(pico64: coatnet.CoAtNet) -> None:
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        pico64.zero_grad(set_to_none=True)
        pico64.train(mode)
        pico64(x).logsumexp(1).sum().backward()
        for name, p in pico64.named_parameters():
            if name.endswith("rel_bias.table"):
                assert p.grad is not None and p.grad.abs().sum() > 0, (name, mode)


def test_training_forward_regathers_after_table_update(pico64: coatnet.CoAtNet) -> None:
    attn = pico64.stages[2].blocks[0].attn
    x = torch.randn(2, 16, 32)
    y0 = attn(x)
    with torch.no_grad():
        attn.rel_bias.table.add_(1.0 * torch.randn_like(attn.rel_bias.table))
    assert not torch.allclose(attn(x), y0)


@pytest.mark.parametrize("grid", [(4, 4), (7, 7), (3, 5)])
def test_fused_and_eager_attention_agree_fp32(grid: tuple[int, int]) -> None:
    attn = RelativeAttention(48, 64, 16, grid, impl="sdpa")
    torch.nn.init.normal_(attn.rel_bias.table, std=1.0)  # a bias large enough to matter
    x = torch.randn(3, grid[0] * grid[1], 48, requires_grad=True)
    fused = attn(x)
    g_fused = torch.autograd.grad(fused.square().sum(), [x, attn.rel_bias.table])
    attn.impl = "eager"
    ref = attn(x)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, attn.rel_bias.table])
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_whole_model_fused_equals_eager(pico64: coatnet.CoAtNet) -> None:
    pico64.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = pico64(x)
        pico64.set_attn_impl("eager")
        ref = pico64(x)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_eager_attention_is_textbook_softmax() -> None:
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    bias = torch.randn(2, 5, 5)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 2.0 + bias
    torch.testing.assert_close(eager_attention(q, k, v, bias, 0.5), torch.softmax(scores, -1) @ v)
