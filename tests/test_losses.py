"""The masked losses: the student's mask term counts only the instances that have stored targets, without a
host sync, and is the plain loss bit for bit when every instance has them."""

from __future__ import annotations

import pytest
import torch

from odkd.models.losses import mask_loss


def _logits_and_mask(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 1, 16, 12, generator=g)
    mask = (torch.rand(6, 1, 16, 12, generator=g) > 0.6).float()
    return logits, mask


@pytest.mark.parametrize("kind", ["bce", "bce+dice"])
def test_every_sample_counted_is_the_plain_loss_bit_for_bit(kind):
    logits, mask = _logits_and_mask()
    plain_in, weighted_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain = mask_loss(plain_in, mask, kind)
    weighted = mask_loss(weighted_in, mask, kind, weight=torch.ones(6, dtype=torch.bool))
    plain.backward()
    weighted.backward()
    assert torch.equal(plain, weighted) and torch.equal(plain_in.grad, weighted_in.grad)


@pytest.mark.parametrize("kind", ["bce", "bce+dice"])
def test_uncounted_samples_are_left_out(kind):
    logits, mask = _logits_and_mask(1)
    ok = torch.tensor([True, False, True, True, False, True])
    inputs = logits.clone().requires_grad_()
    loss = mask_loss(inputs, mask, kind, weight=ok)
    loss.backward()
    assert loss.item() == pytest.approx(mask_loss(logits[ok], mask[ok], kind).item(), rel=1e-6)
    assert not inputs.grad[~ok].any() and inputs.grad[ok].abs().sum() > 0
    none = mask_loss(logits, mask, kind, weight=torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0
