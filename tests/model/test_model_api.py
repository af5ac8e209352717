"""Shapes, model API, stochastic depth, determinism, meta-device construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coatnet
from coatnet.blocks import MBConv, TransformerBlock
from coatnet.layers import DropPath


@pytest.mark.parametrize("res", [224, 384, 512])
def test_output_and_stage_shapes_real_forward(res: int) -> None:
    model = coatnet.create_model("coatnet_pico", num_classes=5, img_size=res).eval()
    with torch.no_grad():
        stages = model.forward_stages(torch.randn(1, 3, res, res))
        out = model(torch.randn(1, 3, res, res))
    widths = [16, 24, 32, 64, 128]
    assert [tuple(s.shape) for s in stages] == [(1, c, res // 2**k, res // 2**k) for k, c in zip(range(1, 6), widths)]
    assert out.shape == (1, 5)


@pytest.mark.parametrize(
    "name, res", [("coatnet_0", 224), ("coatnet_0", 384), ("coatnet_0", 512), ("coatnet_6", 384)]
)
def test_paper_variant_shapes_on_meta(name: str, res: int) -> None:
    model = coatnet.create_model(name, img_size=res, device="meta").eval()
    cfg = model.config
    with torch.no_grad():
        stages = model.forward_stages(torch.empty(2, 3, res, res, device="meta"))
        feats = model.forward_features(torch.empty(2, 3, res, res, device="meta"))
    widths = [cfg.stem_width, *cfg.widths]
    assert [tuple(s.shape) for s in stages] == [(2, c, res // 2**k, res // 2**k) for k, c in zip(range(1, 6), widths)]
    assert feats.shape == (2, cfg.widths[-1], res // 32, res // 32)
    assert model.forward_head(feats).shape == (2, 1000)
    assert model.forward_head(feats, pre_logits=True).shape == (2, cfg.widths[-1])


def test_odd_sizes_and_wrong_input_size_error() -> None:
    model = coatnet.create_model("coatnet_pico", num_classes=3, img_size=(50, 70)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 3)
        with pytest.raises(ValueError, match="img_size"):
            model(torch.randn(1, 3, 64, 64))
        with pytest.raises(ValueError, match="expected"):
            model(torch.randn(1, 1, 50, 70))


def test_mixed_s3_of_coatnet_7() -> None:
    model = coatnet.create_model("coatnet_7", device="meta")
    s3 = list(model.stages[2].blocks)
    assert [type(b) for b in s3] == [MBConv] * 8 + [TransformerBlock] * 42
    assert s3[8].attn.num_heads == 2048 // 128
    assert isinstance(s3[8].shortcut, torch.nn.Linear)  # 1024 -> 2048 projection shortcut
    assert s3[8].pool is None and s3[0].conv1.stride == (2, 2)


def test_meta_coatnet_7_allocates_nothing_and_materialises_small_ones() -> None:
    model = coatnet.create_model("coatnet_7", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert 2.3e9 < sum(p.numel() for p in model.parameters()) < 2.5e9
    small = coatnet.create_model("coatnet_pico", num_classes=4, img_size=64, device="meta")
    small.to_empty(device="cpu")
    small.init_weights()
    ref = coatnet.create_model("coatnet_pico", num_classes=4, img_size=64)
    for (n, a), b in zip(small.named_buffers(), ref.buffers()):
        if n.endswith("index"):
            assert torch.equal(a, b)
    small.eval()
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(2, 3, 64, 64))).all()


def test_parameters_are_contiguous(pico64: coatnet.CoAtNet) -> None:
    # DeepSpeed's bf16 broadcast fails on channels_last parameters: only activations go channels_last.
    assert all(p.is_contiguous() for p in pico64.parameters())
    pico64(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.is_contiguous() for p in pico64.parameters())


def test_no_weight_decay(pico64: coatnet.CoAtNet) -> None:
    nwd = pico64.no_weight_decay()
    params = dict(pico64.named_parameters())
    assert "stages.2.blocks.0.attn.rel_bias.table" in nwd
    assert "stages.0.blocks.0.norm.weight" in nwd and "head.norm.bias" in nwd and "head.fc.bias" in nwd
    assert "head.fc.weight" not in nwd and "stages.0.blocks.0.conv1.weight" not in nwd
    assert all(params[n].ndim > 1 for n in set(params) - nwd)
    assert nwd <= set(params)


def test_reset_classifier(pico: coatnet.CoAtNet) -> None:
    pico.reset_classifier(3)
    assert pico(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert pico.num_classes == 3 and pico.config.num_classes == 3
    pico.reset_classifier(0)
    assert pico(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_eval_is_deterministic_even_with_stochastic_depth() -> None:
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():  # train mode drops paths at random: two forwards differ
        assert not torch.allclose(model(x), model(x))


def test_stochastic_depth_ramps_linearly_over_all_blocks() -> None:
    model = coatnet.create_model("coatnet_0", drop_path_rate=0.3, device="meta")
    rates = [m.rate for m in model.modules() if isinstance(m, DropPath)]
    n = sum(model.config.depths)
    assert len(rates) == n
    assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)])
    m7 = coatnet.create_model("coatnet_7", drop_path_rate=0.2, device="meta")
    r7 = [m.rate for m in m7.modules() if isinstance(m, DropPath)]
    assert len(r7) == m7.config.total_blocks() == 2 + 4 + 8 + 42 + 2 and r7[-1] == pytest.approx(0.2)


def test_drop_path_drops_whole_samples() -> None:
    dp = DropPath(0.5).train()
    y = dp(torch.ones(4000, 3, 2, 2))
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # kept samples are scaled by 1/keep
    assert (per_sample == per_sample[:, :1]).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.05


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64)
        model.set_grad_checkpointing(ckpt)
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("overrides", [{"downsample": "strided_dwconv"}, {"pool": "avg"}])
def test_block_options_build_and_train(overrides: dict) -> None:
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64, **overrides)
    if "downsample" in overrides:
        b = model.stages[0].blocks[0]
        assert b.conv1.stride == (1, 1) and b.conv2.stride == (2, 2)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)


def test_eq5_default_stride_in_first_1x1_and_max_pool_shortcut(pico64: coatnet.CoAtNet) -> None:
    b = pico64.stages[0].blocks[0]
    assert b.conv1.stride == (2, 2) and b.conv2.stride == (1, 1) and b.pool.kind == "max"
    assert pico64.stages[2].blocks[0].pool.kind == "max"


def test_pre_activation_layout(pico64: coatnet.CoAtNet) -> None:
    """The residual stream is never normalised in place: zeroing a block's branch output leaves x + 0."""
    block = pico64.stages[1].blocks[0]
    assert isinstance(block.norm, torch.nn.BatchNorm2d)  # norm on the branch input
    pico64.eval()
    torch.nn.init.zeros_(block.conv3.weight)
    torch.nn.init.zeros_(block.conv3.bias)
    x = torch.randn(2, 24, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.shortcut(block.pool(x)))
