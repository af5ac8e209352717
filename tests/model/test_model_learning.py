"""A small variant learns real handwriting (scikit-learn's digits) in a plain PyTorch loop.

Shape-correct but mis-wired blocks (a residual added twice, attention over the wrong axis, a bias
that never reaches the scores) train to noticeably worse held-out accuracy; this guards against them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coatnet


def digits_32px() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # 8x8, values 0..16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pico_learns_digits_to_95_percent_held_out() -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_32px()
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=32, drop_path_rate=0.05)
    nwd = model.no_weight_decay()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in nwd], "weight_decay": 0.05},
        {"params": [p for n, p in model.named_parameters() if n in nwd], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=3e-3)
    epochs, bs = 12, 64
    steps_per_epoch = len(xtr) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"
