"""Fixtures for the model tests: deterministic seeds and small models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import coatnet


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is fastest, and on a shared, oversubscribed machine
    OpenMP's spinning workers made 2-thread runs 10-30x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def pico() -> coatnet.CoAtNet:
    """coatnet_pico at 32x32 with 10 classes (about 0.4M parameters)."""
    return coatnet.create_model("coatnet_pico", num_classes=10, img_size=32)


@pytest.fixture
def pico64() -> coatnet.CoAtNet:
    """coatnet_pico at 64x64: S3 runs on a 4x4 grid, S4 on 2x2, so the relative tables are non-trivial."""
    return coatnet.create_model("coatnet_pico", num_classes=10, img_size=64)
