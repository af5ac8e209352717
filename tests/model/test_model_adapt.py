"""Resolution change and head handling: one adaptation function, called by the model's load hook."""

from __future__ import annotations

import pytest
import torch

import coatnet
from coatnet.adapt import adapt_state_dict, resize_rel_pos_table


def test_resize_to_own_size_is_identity() -> None:
    t = torch.randn(4, 27, 27)
    torch.testing.assert_close(resize_rel_pos_table(t, (27, 27)), t, rtol=0, atol=1e-6)


def test_constant_table_stays_constant() -> None:
    t = torch.full((2, 27, 27), 0.37)
    out = resize_rel_pos_table(t, (47, 47))
    assert out.shape == (2, 47, 47)
    torch.testing.assert_close(out, torch.full_like(out, 0.37))


def test_resize_keeps_zero_offset_at_centre_and_dtype() -> None:
    t = torch.zeros(1, 7, 7, dtype=torch.bfloat16)
    t[0, 3, 3] = 1.0  # a peak at offset (0, 0)
    out = resize_rel_pos_table(t, (13, 13))
    assert out.dtype == torch.bfloat16
    assert divmod(int(out[0].float().argmax()), 13) == (6, 6)


def test_224_state_dict_loads_into_384_model_via_load_hook() -> None:
    m224 = coatnet.create_model("coatnet_pico", num_classes=10, img_size=224)
    m384 = coatnet.create_model("coatnet_pico", num_classes=10, img_size=384)
    sd = m224.state_dict()
    result = m384.load_state_dict(sd)  # strict by default
    assert not result.missing_keys and not result.unexpected_keys
    key = "stages.2.blocks.0.attn.rel_bias.table"
    assert sd[key].shape == (4, 27, 27) and m384.state_dict()[key].shape == (4, 47, 47)
    torch.testing.assert_close(m384.state_dict()[key], resize_rel_pos_table(sd[key], (47, 47)))
    assert sd[key].shape == (4, 27, 27)  # the caller's dict is not modified
    same = [k for k in sd if "rel_bias" not in k]
    assert all(torch.equal(sd[k], m384.state_dict()[k]) for k in same)


def test_paper_variant_224_to_512_no_missing_or_unexpected_keys() -> None:
    sd = coatnet.create_model("coatnet_6", device="meta").state_dict()
    target = coatnet.get_config("coatnet_6").replace(img_size=512)
    out = adapt_state_dict(sd, target)
    want = coatnet.create_model(target, device="meta").state_dict()
    assert set(out) == set(want)
    assert all(out[k].shape == want[k].shape for k in want)


def test_compiled_or_wrapped_checkpoint_prefixes_are_stripped(pico: coatnet.CoAtNet) -> None:
    sd = {f"_orig_mod.{k}": v for k, v in pico.state_dict().items()}
    other = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64)
    assert not other.load_state_dict(sd).missing_keys
    sd = {f"module.{k}": v for k, v in pico.state_dict().items()}
    assert not other.load_state_dict(sd).unexpected_keys


def test_class_count_mismatch_is_an_explicit_error(pico: coatnet.CoAtNet) -> None:
    other = coatnet.create_model("coatnet_pico", num_classes=3, img_size=32)
    before = other.head.fc.weight.clone()
    with pytest.raises(RuntimeError, match="head='reset'"):
        other.load_state_dict(pico.state_dict())
    assert torch.equal(other.head.fc.weight, before)


def test_head_reset_keeps_the_trunk(pico: coatnet.CoAtNet) -> None:
    other = coatnet.create_model("coatnet_pico", num_classes=3, img_size=64)
    res = coatnet.load_pretrained(other, pico.state_dict(), head="reset")
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(other.stem.conv1.weight, pico.stem.conv1.weight)
    assert other.head.fc.weight.shape == (3, 128) and torch.equal(other.head.fc.bias, torch.zeros(3))


def test_head_select_maps_rows(pico: coatnet.CoAtNet) -> None:
    other = coatnet.create_model("coatnet_pico", num_classes=3, img_size=32)
    coatnet.load_pretrained(other, pico.state_dict(), head="select", class_index=[7, 0, 4])
    torch.testing.assert_close(other.head.fc.weight, pico.head.fc.weight[[7, 0, 4]])
    torch.testing.assert_close(other.head.fc.bias, pico.head.fc.bias[[7, 0, 4]])
    with pytest.raises(ValueError, match="entries"):
        adapt_state_dict(pico.state_dict(), other, head="select", class_index=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        adapt_state_dict(pico.state_dict(), other, head="select", class_index=[1, 2, 10])
    with pytest.raises(ValueError, match="class_index"):
        adapt_state_dict(pico.state_dict(), other, head="reset", class_index=[1, 2, 3])


def test_table_with_other_head_count_is_rejected_by_name(pico: coatnet.CoAtNet) -> None:
    sd = pico.state_dict()
    key = "stages.2.blocks.0.attn.rel_bias.table"
    sd[key] = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match=key):
        adapt_state_dict(sd, pico)
