"""Mask losses and metrics against hand-computed values."""

import math

import pytest
import torch

from flmm_hf.losses import bce_per_mask, dice_per_mask, mask_losses, resize_gt_masks

BIG = 30.0  # sigmoid(30) = 1 - 9.4e-14: a confident logit


def test_perfect_prediction():
    gt = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]]], dtype=torch.bool)
    logits = torch.where(gt, BIG, -BIG)
    out = mask_losses(logits, gt)
    assert out["loss_bce"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["loss_dice"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["accuracy"].item() == 1.0
    assert out["aiou"].item() == 1.0


def test_zero_logits():
    # p = 0.5 everywhere. Mask 0: one of 4 pixels set; mask 1: empty.
    gt = torch.zeros(2, 2, 2, dtype=torch.bool)
    gt[0, 0, 0] = True
    out = mask_losses(torch.zeros(2, 2, 2), gt)
    assert out["loss_bce"].item() == pytest.approx(math.log(2), rel=1e-6)
    # Dice, naive with eps 1: mask 0: 1 - (2*0.5 + 1) / (2 + 1 + 1) = 0.5; mask 1: 1 - 1 / (2 + 0 + 1) = 2/3.
    assert out["loss_dice"].item() == pytest.approx((0.5 + 2 / 3) / 2, rel=1e-6)
    # sigmoid(0) = 0.5 is not > 0.5: nothing predicted. Accuracy 3/4 and 1; IoU 0 and 0 (empty union).
    assert out["accuracy"].item() == pytest.approx((0.75 + 1.0) / 2)
    assert out["aiou"].item() == 0.0


def test_empty_masks():
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    out = mask_losses(torch.full((1, 4, 4), -BIG), gt)
    assert out["loss_bce"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["loss_dice"].item() == pytest.approx(0.0, abs=1e-9)  # 1 - 1 / (16 * 9e-14 + 1)
    assert out["accuracy"].item() == 1.0
    assert out["aiou"].item() == 0.0  # an empty union counts as IoU 0, as in the original

    # Predicting everything on an empty mask: Dice 1 - 1 / (16 + 1).
    out = mask_losses(torch.full((1, 4, 4), BIG), gt)
    assert out["loss_dice"].item() == pytest.approx(16 / 17, rel=1e-6)
    assert out["loss_bce"].item() == pytest.approx(BIG, rel=1e-6)
    assert out["accuracy"].item() == 0.0


def test_bce_and_dice_values():
    logits = torch.tensor([[[1.0, -2.0]]])
    target = torch.tensor([[[1.0, 0.0]]])
    expected_bce = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2
    assert bce_per_mask(logits, target).item() == pytest.approx(expected_bce, rel=1e-6)
    p0, p1 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0))
    expected_dice = 1 - (2 * p0 + 1) / (p0 + p1 + 1 + 1)  # first powers: not p0**2 + p1**2
    assert dice_per_mask(logits, target).item() == pytest.approx(expected_dice, rel=1e-6)


def test_ground_truth_resized_nearest():
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0] = True  # kept: nearest picks source rows/cols 0 and 2
    gt[0, 1, 1] = True  # dropped
    assert resize_gt_masks(gt, (2, 2)).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    out = mask_losses(torch.tensor([[[BIG, -BIG], [-BIG, -BIG]]]), gt)
    assert out["aiou"].item() == 1.0


def test_examples_of_different_sizes_match_per_example_weighting():
    """The original averages per example (BCE over all its pixels), weighted by its number of masks."""
    torch.manual_seed(0)
    preds = [torch.randn(1, 4, 4), torch.randn(2, 2, 3)]
    gts = [torch.rand(1, 8, 8) > 0.5, torch.rand(2, 4, 6) > 0.5]
    out = mask_losses(preds, gts)

    bce, dice, count = 0.0, 0.0, 0
    for pred, gt in zip(preds, gts):
        target = resize_gt_masks(gt, pred.shape[-2:])
        example_bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, target)  # mean over pixels
        example_dice = dice_per_mask(pred, target).mean()
        bce += example_bce * len(pred)
        dice += example_dice * len(pred)
        count += len(pred)
    torch.testing.assert_close(out["loss_bce"], bce / count)
    torch.testing.assert_close(out["loss_dice"], dice / count)


def test_losses_are_differentiable():
    logits = torch.zeros(2, 3, 3, requires_grad=True)
    gt = torch.ones(2, 3, 3, dtype=torch.bool)
    out = mask_losses(logits, gt)
    (out["loss_bce"] + out["loss_dice"]).backward()
    assert logits.grad is not None and (logits.grad < 0).all()  # push every logit up
    assert not out["accuracy"].requires_grad and not out["aiou"].requires_grad


def test_mismatched_counts_raise():
    with pytest.raises(ValueError):
        mask_losses(torch.zeros(2, 3, 3), torch.zeros(3, 3, 3, dtype=torch.bool))
