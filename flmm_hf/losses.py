"""Mask losses and training metrics of F-LMM.

The original computes, per example, mmdet's `CrossEntropyLoss(use_sigmoid=True)` averaged over all
pixels of the example's masks and mmdet's `DiceLoss(use_sigmoid=True, naive_dice=True, eps=1.0)`
averaged over its masks, both with weight 1, then averages the examples weighted by their number
of masks. Since all masks of one example share a size, that equals averaging per-mask values over
all masks of the batch, which is what these functions do: the result does not depend on how the
phrases are grouped into examples. (mmdet divides by `avg_factor + 1.2e-7`; the difference is
below float32 precision for any real count.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resize_gt_masks(gt_masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize binary masks `[K, H0, W0]` to `size` with PyTorch's `nearest` mode (as the original), as float."""
    return F.interpolate(gt_masks[None].float(), size=tuple(int(v) for v in size), mode="nearest")[0]


def bce_per_mask(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over the pixels of each mask.

    Args:
        pred_logits (`torch.Tensor` of shape `(K, H, W)`): logits.
        targets (`torch.Tensor` of shape `(K, H, W)`): 0/1 targets.

    Returns:
        `torch.Tensor` of shape `(K,)`.
    """
    loss = F.binary_cross_entropy_with_logits(pred_logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(dim=1)


def dice_per_mask(pred_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Naive Dice loss on sigmoid probabilities: `1 - (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)`.

    "Naive": first powers in the denominator (mmdet's `naive_dice=True`), eps in numerator and
    denominator; an empty target gives `1 - eps / (sum(p) + eps)`, small when the prediction is empty too.

    Args:
        pred_logits (`torch.Tensor` of shape `(K, H, W)`): logits.
        targets (`torch.Tensor` of shape `(K, H, W)`): 0/1 targets.
        eps (`float`, *optional*, defaults to 1.0): smoothing term.

    Returns:
        `torch.Tensor` of shape `(K,)`.
    """
    probs = pred_logits.float().sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    intersection = (probs * targets).sum(dim=1)
    return 1 - (2 * intersection + eps) / (probs.sum(dim=1) + targets.sum(dim=1) + eps)


@torch.no_grad()
def accuracy_and_iou_per_mask(pred_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel accuracy and IoU of `sigmoid(logits) > 0.5` per mask; an empty union gives IoU 0.

    Returns:
        two `torch.Tensor`s of shape `(K,)`.
    """
    preds = (pred_logits.float().sigmoid() > 0.5).float().flatten(1)
    targets = targets.float().flatten(1)
    accuracy = (preds == targets).float().mean(dim=1)
    intersection = (preds * targets).sum(dim=1)
    union = (preds + targets - preds * targets).sum(dim=1)
    return accuracy, intersection / (union + 1e-12)


def mask_losses(
    pred_logits: torch.Tensor | Sequence[torch.Tensor],
    gt_masks: torch.Tensor | Sequence[torch.Tensor],
    dice_eps: float = 1.0,
) -> dict[str, torch.Tensor]:
    """BCE + Dice losses and 0.5-threshold metrics of predicted mask logits against ground truth.

    Ground truth is resized (nearest) to each prediction's size.

    Args:
        pred_logits: `[K, H, W]` logits, or a list with one `[K_b, H_b, W_b]` tensor per example
            (examples may have different sizes).
        gt_masks: `[K, H0, W0]` binary masks, or a list matching `pred_logits`.
        dice_eps: Dice smoothing term (F-LMM: 1.0).

    Returns:
        dict with scalar tensors `loss_bce` and `loss_dice` (means over all masks; each weight 1,
        differentiable; the original calls the BCE `loss_mask`), and `accuracy` and `aiou` (pixel
        accuracy and IoU at 0.5, means over all masks, no gradient).
    """
    if isinstance(pred_logits, torch.Tensor):
        pred_logits, gt_masks = [pred_logits], [gt_masks]
    if len(pred_logits) != len(gt_masks):
        raise ValueError(f"{len(pred_logits)} predictions for {len(gt_masks)} ground-truth sets")

    bce, dice, accuracy, iou = [], [], [], []
    for preds, masks in zip(pred_logits, gt_masks):
        if preds.shape[0] != masks.shape[0]:
            raise ValueError(f"{preds.shape[0]} predicted masks for {masks.shape[0]} ground-truth masks")
        if preds.shape[0] == 0:  # an example without phrases adds no mask (resizing an empty stack fails)
            continue
        targets = resize_gt_masks(masks, preds.shape[-2:]).to(preds.device)
        bce.append(bce_per_mask(preds, targets))
        dice.append(dice_per_mask(preds, targets, eps=dice_eps))
        acc, mask_iou = accuracy_and_iou_per_mask(preds, targets)
        accuracy.append(acc)
        iou.append(mask_iou)
    if sum(int(preds.shape[0]) for preds in pred_logits) == 0:
        # No masks in the whole batch: zero losses that still backpropagate (to nothing), not NaN means.
        start = pred_logits[0].new_zeros(()) if len(pred_logits) else torch.zeros(())
        zero = sum((preds.sum() for preds in pred_logits), start) * 0.0
        return {"loss_bce": zero, "loss_dice": zero, "accuracy": zero.detach(), "aiou": zero.detach()}
    return {
        "loss_bce": torch.cat(bce).mean(),
        "loss_dice": torch.cat(dice).mean(),
        "accuracy": torch.cat(accuracy).mean(),
        "aiou": torch.cat(iou).mean(),
    }
