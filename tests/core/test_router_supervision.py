"""Supervised routing losses (DriveMoE focal loss on camera / action routers) and camera top-k selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moezoo.core.losses import router_supervision_loss
from moezoo.core.modules import CameraRouter


def test_supervision_loss_plain_focal_alpha_and_ignore():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 3, 1, 1, 2, 0])
    assert torch.allclose(router_supervision_loss(logits, y), F.cross_entropy(logits, y))
    ce = F.cross_entropy(logits, y, reduction="none")
    p = torch.exp(-ce)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    want = (alpha[y] * (1 - p) ** 2 * ce).mean()
    assert torch.allclose(router_supervision_loss(logits, y, gamma=2.0, alpha=alpha), want)
    y2 = y.clone()
    y2[1] = -100
    keep = y2 != -100
    assert torch.allclose(router_supervision_loss(logits, y2), F.cross_entropy(logits[keep], y[keep]))
    lg = logits.clone().requires_grad_()
    router_supervision_loss(lg, torch.full((6,), -100)).backward()
    assert lg.grad is not None and lg.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="labels must be in"):
        router_supervision_loss(logits, torch.tensor([0, 4, 1, 1, 2, 0]))
    with pytest.raises(ValueError, match="one per sample"):
        router_supervision_loss(logits, y[:3])
    with pytest.raises(ValueError, match="alpha"):
        router_supervision_loss(logits, y, alpha=torch.ones(3))


def test_camera_select_topk_eval_and_training():
    torch.manual_seed(1)
    r = CameraRouter(8, 5, num_heads=2)
    logits = torch.randn(3, 5)
    r.eval()
    slots, idx = r.select_topk(logits, 2)
    assert slots.shape == (3, 2, 5) and torch.equal(idx, logits.topk(2, -1).indices)
    assert torch.equal(slots.argmax(-1), idx) and torch.equal(slots.sum(-1), torch.ones(3, 2))
    r.train()
    lg = logits.clone().requires_grad_()
    slots, idx = r.select_topk(lg, 3)
    assert ((slots - F.one_hot(idx, 5).float()).abs() < 1e-6).all()  # forward value: hard one-hot
    assert all(len(set(row.tolist())) == 3 for row in idx)  # k distinct views
    (slots * torch.arange(5.0)).sum().backward()
    assert lg.grad.abs().sum() > 0  # straight-through gradient reaches the logits
    torch.manual_seed(2)
    a = r.select_topk(logits, 1)[0][:, 0]
    torch.manual_seed(2)
    b = F.gumbel_softmax(logits, tau=1.0, hard=True)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    with pytest.raises(ValueError, match="top_k"):
        r.select_topk(logits, 6)
