"""Every optimised path gives the reference path's numbers (issue 8's CPU side).

Optimised paths: SDPA with a float mask (reference: eager softmax attention, see test_model_attention.py),
the inference cache of the gathered bias (reference: a fresh gather), channels_last activations
(reference: NCHW), the aligned bias layout (reference: a contiguous mask), torch.compile (reference:
eager), bf16 (reference: fp32, loosely).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coatnet
from coatnet.attention import RelativePositionBias


def _tables(model: coatnet.CoAtNet) -> list[RelativePositionBias]:
    return [m for m in model.modules() if isinstance(m, RelativePositionBias)]


def test_bias_cache_is_used_in_inference_and_matches_a_fresh_gather(pico64: coatnet.CoAtNet) -> None:
    pico64.eval()
    rpb = _tables(pico64)[0]
    with torch.no_grad():
        a = rpb(torch.float32)
        assert rpb(torch.float32) is a  # cached: same tensor, no second gather
        pico64.eval()  # an evaluation loop calling eval() again keeps the (still valid) cache
        assert rpb(torch.float32) is a
        torch.testing.assert_close(a, rpb.gather(torch.float32), rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cached = pico64(x)
        pico64.set_bias_cache(False)
        fresh = pico64(x)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)


def test_bias_cache_across_inference_mode_and_frozen_grad_use(pico64: coatnet.CoAtNet) -> None:
    """A bias cached under inference_mode does not break a later frozen-trunk forward that needs input grads."""
    pico64.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = pico64(x)
    pico64.requires_grad_(False)
    xg = x.clone().requires_grad_()
    out = pico64(xg)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref)
    assert xg.grad is not None


def test_bias_cache_never_used_in_training_or_with_grad(pico64: coatnet.CoAtNet) -> None:
    rpb = _tables(pico64)[0]
    pico64.train()
    assert rpb(torch.float32) is not rpb(torch.float32)
    pico64.eval()
    out = rpb(torch.float32)  # grad enabled and the table requires grad: gathered, with a graph
    assert out.requires_grad and rpb(torch.float32) is not out


def test_bias_cache_invalidated_by_optimizer_step_load_and_train(pico64: coatnet.CoAtNet) -> None:
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    opt = torch.optim.SGD(pico64.parameters(), lr=1.0)

    def eval_out() -> torch.Tensor:
        pico64.eval()
        with torch.no_grad():
            return pico64(x)

    def reference() -> torch.Tensor:
        pico64.set_bias_cache(False)
        out = eval_out()
        pico64.set_bias_cache(True)
        return out

    eval_out()  # fills the caches
    # 1. a parameter update while staying in eval mode (no train() call in between)
    F.cross_entropy(pico64(x), y).backward()
    opt.step()
    torch.testing.assert_close(eval_out(), reference(), rtol=0, atol=0)
    # 2. load_state_dict of different tables
    other = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64).state_dict()
    before = eval_out()
    pico64.load_state_dict(other)
    after = eval_out()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference(), rtol=0, atol=0)
    # 3. train() clears the cache outright
    eval_out()
    assert all(t._cache is not None for t in _tables(pico64))
    pico64.train()
    assert all(t._cache is None for t in _tables(pico64))
    # 4. a dtype change (.to) re-gathers in the new dtype
    eval_out()
    pico64.to(torch.float64)
    pico64.eval()
    with torch.no_grad():
        assert pico64(x.double()).dtype == torch.float64


def test_aligned_bias_layout_equals_a_contiguous_mask() -> None:
    rpb = RelativePositionBias(4, (7, 7))
    torch.nn.init.normal_(rpb.table)
    bias = rpb.gather()
    assert not bias.is_contiguous()
    q, k, v = (torch.randn(2, 4, 49, 16) for _ in range(3))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.contiguous())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_channels_last_equals_nchw_forward_and_gradients() -> None:
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 4])
    outs, grads = [], []
    for cl in (True, False):
        torch.manual_seed(0)
        model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64, channels_last=cl)
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_no_layout_copies_between_conv_and_attention_stages(pico64: coatnet.CoAtNet) -> None:
    """With channels_last activations the (B, H, W, C) view a Transformer block works on is free."""
    pico64.eval()
    with torch.no_grad():
        stages = pico64.forward_stages(torch.randn(2, 3, 64, 64))
    for s in stages[2:]:  # inputs of S3 and S4 blocks, and the final features
        assert s.permute(0, 2, 3, 1).is_contiguous()


def test_torch_compile_fullgraph_matches_eager_in_train_and_eval() -> None:
    """No graph breaks (fullgraph=True) and the compiled model gives the eager numbers and gradients.

    aot_eager traces exactly what inductor would receive (Dynamo + AOTAutograd); inductor's own
    code generation is covered by the slow test below.
    """
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    F.cross_entropy(model(x), y).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(compiled(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_compile_inductor_matches_eager() -> None:
    """Inductor's generated code for the relative-attention stage, forward and backward.

    One Transformer stage (pooling, LayerNorm, gather, SDPA with the float mask, FFN) keeps the C++
    build to a few kernels; the whole model's tracing is covered above.
    """
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64)
    stage = model.stages[2]
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = stage(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = torch.compile(stage, fullgraph=True)(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_runs_and_tracks_fp32(pico64: coatnet.CoAtNet) -> None:
    x = torch.randn(4, 3, 64, 64)
    pico64.eval()
    with torch.no_grad():
        ref = pico64(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = pico64(x)
    assert low.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pico64.parameters())
    assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.99
    pico64.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(pico64(x), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in pico64.parameters())


def test_pure_bf16_module_as_deepspeed_casts_it(pico64: coatnet.CoAtNet) -> None:
    x = torch.randn(4, 3, 64, 64)
    pico64.eval()
    with torch.no_grad():
        ref = pico64(x)
        pico64.to(torch.bfloat16)
        fused = pico64(x.bfloat16())
        pico64.set_attn_impl("eager")
        eager = pico64(x.bfloat16())
    assert fused.dtype == torch.bfloat16
    assert F.cosine_similarity(fused.float().flatten(), ref.flatten(), dim=0) > 0.99
    torch.testing.assert_close(fused.float(), eager.float(), rtol=0.05, atol=0.05)
