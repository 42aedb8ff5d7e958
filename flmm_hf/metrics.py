"""Evaluation metrics of the paper's benchmarks: RES cIoU / gIoU and PNG average recall.

- Referring expression segmentation (RES): cIoU and mIoU (also called gIoU), as mmdet's
  ``RefSegMetric`` computes them: cIoU = 100 * sum of intersections / sum of unions over all
  expressions, mIoU = 100 * mean of per-expression IoU, where an empty union counts as IoU 0.
- Panoptic narrative grounding (PNG): per-phrase IoU; average recall = the area under
  recall(t) = fraction of phrases with IoU >= t, integrated as the original PNG evaluation
  does (thresholds ``np.arange(0, 1, 1e-5)``, left Riemann sum over consecutive thresholds),
  overall and for things, stuff, singulars and plurals (plural phrases count as things), plus
  accuracy at IoU 0.5 (strictly greater, as the original) and pixel accuracy.

Masks are boolean (or integer, non-zero = foreground) numpy arrays or torch tensors, one mask
``[H, W]`` or a stack ``[N, H, W]``; a list of such items allows mixed sizes. Float masks are
rejected: threshold probabilities first. All percentages are in 0-100.

For distributed evaluation, :class:`MaskIoUAccumulator` keeps per-mask pixel counts, so that
each process accumulates its share, the ``state_dict()`` of every process is gathered once and
:meth:`MaskIoUAccumulator.merge` concatenates them (in process order) before computing.

The ``evaluate`` modules in ``metric_modules/`` (see :func:`metric_module_path`) are thin
wrappers over these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
import torch

MaskArray = Union[np.ndarray, torch.Tensor]
Masks = Union[MaskArray, Sequence[MaskArray]]
Flags = Union[np.ndarray, torch.Tensor, Sequence[bool], None]

#: Step of the IoU thresholds over [0, 1) used by the original PNG average recall.
PNG_THRESHOLD_STEP = 1e-5

#: Folder of the ``evaluate`` metric modules shipped with the package.
METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"

RES_KEYS = ("ciou", "miou")
PNG_KEYS = ("ar", "ar_things", "ar_stuff", "ar_singulars", "ar_plurals", "acc_50")


def metric_module_path(name: str) -> str:
    """Path of a shipped ``evaluate`` module script, for ``evaluate.load(metric_module_path(name))``.

    Args:
        name: ``"refer_seg"`` or ``"png_recall"``.
    """
    path = METRIC_MODULES_DIR / name / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no metric module named {name!r} in {METRIC_MODULES_DIR}")
    return str(path)


class MaskIoU(NamedTuple):
    """Per-mask pixel counts and IoU, each a numpy array of shape ``[N]``."""

    intersection: np.ndarray  # int64, |pred & gt|
    union: np.ndarray  # int64, |pred | gt|
    num_pixels: np.ndarray  # int64, H * W of the mask
    iou: np.ndarray  # float64, intersection / union, 0 where the union is empty


# ----------------------------------------------------------------------------------------------
# Per-mask counts
# ----------------------------------------------------------------------------------------------
def _as_bool_stack(mask: MaskArray, name: str) -> MaskArray:
    """One item ``[H, W]`` or ``[N, H, W]`` as a boolean ``[N, H, W]`` array/tensor."""
    if isinstance(mask, torch.Tensor):
        is_float = mask.is_floating_point() or mask.is_complex()
        is_bool = mask.dtype == torch.bool
    else:
        mask = np.asarray(mask)
        is_float = mask.dtype.kind in "fc"
        is_bool = mask.dtype == np.bool_
    if is_float:
        raise TypeError(f"{name} must be boolean or integer masks, got {mask.dtype}; threshold them first")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"{name}: a mask item must be [H, W] or [N, H, W], got shape {tuple(mask.shape)}")
    return mask if is_bool else mask != 0


def _items(masks: Masks) -> list[MaskArray]:
    """Split the input into items: an array/tensor is one item, a list/tuple is many."""
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        return [masks]
    return list(masks)


def _counts_one(pred: MaskArray, gt: MaskArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection, union and pixel counts of one item (a batch of same-sized masks)."""
    pred = _as_bool_stack(pred, "pred_masks")
    gt = _as_bool_stack(gt, "gt_masks")
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        pred = torch.as_tensor(pred)
        gt = torch.as_tensor(gt, device=pred.device)
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred and gt masks differ in shape: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    n, h, w = pred.shape
    if isinstance(pred, torch.Tensor):
        inter = (pred & gt).reshape(n, -1).sum(-1).cpu().numpy()
        union = (pred | gt).reshape(n, -1).sum(-1).cpu().numpy()
    else:
        inter = np.logical_and(pred, gt).reshape(n, -1).sum(-1)
        union = np.logical_or(pred, gt).reshape(n, -1).sum(-1)
    pixels = np.full(n, h * w, dtype=np.int64)
    return inter.astype(np.int64), union.astype(np.int64), pixels


def iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """IoU = intersection / union as float64, 0 where the union is empty."""
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def mask_iou(pred_masks: Masks, gt_masks: Masks) -> MaskIoU:
    """Per-mask intersection, union, pixel count and IoU (batched over each stacked item).

    Args:
        pred_masks: predicted masks, ``[H, W]``, ``[N, H, W]`` or a list of those.
        gt_masks: ground-truth masks with the same structure and shapes.

    Returns:
        :class:`MaskIoU` with arrays of shape ``[total number of masks]`` in input order.
    """
    preds, gts = _items(pred_masks), _items(gt_masks)
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} prediction items but {len(gts)} ground-truth items")
    parts = [_counts_one(p, g) for p, g in zip(preds, gts)]
    if parts:
        inter, union, pixels = (np.concatenate(x) for x in zip(*parts))
    else:
        inter = union = pixels = np.zeros(0, dtype=np.int64)
    return MaskIoU(inter, union, pixels, iou_from_counts(inter, union))


# ----------------------------------------------------------------------------------------------
# RES: cIoU / mIoU
# ----------------------------------------------------------------------------------------------
def refer_seg_metrics_from_counts(intersection: np.ndarray, union: np.ndarray) -> dict[str, float]:
    """cIoU and mIoU (0-100) from per-expression intersection and union pixel counts.

    cIoU = 100 * sum(intersection) / sum(union) (0 when every union is empty);
    mIoU = 100 * mean(IoU), an empty union counting as IoU 0. Both are NaN with no expression.
    """
    intersection = np.asarray(intersection, dtype=np.int64).reshape(-1)
    union = np.asarray(union, dtype=np.int64).reshape(-1)
    if intersection.size == 0:
        return {"ciou": float("nan"), "miou": float("nan")}
    total_union = int(union.sum())
    ciou = 100.0 * int(intersection.sum()) / total_union if total_union > 0 else 0.0
    miou = 100.0 * float(np.mean(iou_from_counts(intersection, union)))
    return {"ciou": ciou, "miou": miou}


def refer_seg_metrics(pred_masks: Masks, gt_masks: Masks) -> dict[str, float]:
    """RES cIoU and mIoU (a.k.a. gIoU) in 0-100, one mask per expression.

    Args:
        pred_masks: predicted masks, ``[H, W]``, ``[N, H, W]`` or a list of those (mixed sizes).
        gt_masks: ground-truth masks with the same structure.

    Returns:
        ``{"ciou": ..., "miou": ...}``.
    """
    counts = mask_iou(pred_masks, gt_masks)
    return refer_seg_metrics_from_counts(counts.intersection, counts.union)


# ----------------------------------------------------------------------------------------------
# PNG: average recall
# ----------------------------------------------------------------------------------------------
def _as_float_vector(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def _as_flag_vector(flags: Flags, size: int, name: str) -> np.ndarray | None:
    if flags is None:
        return None
    if isinstance(flags, torch.Tensor):
        flags = flags.detach().cpu().numpy()
    flags = np.asarray(flags).reshape(-1).astype(bool)
    if flags.size != size:
        raise ValueError(f"{name} has {flags.size} entries for {size} IoUs")
    return flags


def recall_curve(ious: Any) -> tuple[np.ndarray, np.ndarray]:
    """recall(t) = fraction of IoUs >= t at the original thresholds ``np.arange(0, 1, 1e-5)``.

    Returns:
        ``(thresholds, recall)``, both float64 of length 100000 (recall in 0-1). Empty input
        gives NaN recall.
    """
    ious = _as_float_vector(ious, "ious")
    thresholds = np.arange(0, 1, PNG_THRESHOLD_STEP)
    if ious.size == 0:
        return thresholds, np.full_like(thresholds, np.nan)
    # number of IoUs >= t = n - number of IoUs < t
    at_least = ious.size - np.searchsorted(np.sort(ious), thresholds, side="left")
    return thresholds, at_least / ious.size


def average_recall(ious: Any) -> float:
    """Area under recall(IoU >= t) in 0-100, integrated exactly as the original PNG evaluation.

    The original sums ``(t[i+1] - t[i]) * recall(t[i])`` over consecutive thresholds
    ``np.arange(0, 1, 1e-5)``, left to right (so recall at the last threshold is unused and a
    perfect prediction scores 99.999). The cumulative sum below adds in the same order, so the
    fraction equals the original's float for float. NaN for no IoUs.
    """
    thresholds, recall = recall_curve(ious)
    if np.isnan(recall[0]):
        return float("nan")
    terms = np.abs(np.diff(thresholds)) * recall[:-1]
    return 100.0 * float(np.cumsum(terms)[-1])


def png_average_recall(ious: Any, isthing: Flags = None, plural: Flags = None) -> dict[str, float]:
    """PNG average recall overall and per subgroup, plus accuracy at IoU 0.5 (all 0-100).

    Args:
        ious: per-phrase IoU, shape ``[N]`` (numpy, torch or a list).
        isthing: per-phrase "thing" flag; plural phrases count as things whatever it says.
            Without it ``ar_things`` and ``ar_stuff`` are NaN.
        plural: per-phrase plural flag. Without it ``ar_singulars`` and ``ar_plurals`` are NaN.

    Returns:
        dict with ``ar``, ``ar_things``, ``ar_stuff``, ``ar_singulars``, ``ar_plurals`` and
        ``acc_50`` (fraction of phrases with IoU > 0.5, strictly, as the original). An empty
        subgroup gives NaN.
    """
    ious = _as_float_vector(ious, "ious")
    isthing = _as_flag_vector(isthing, ious.size, "isthing")
    plural = _as_flag_vector(plural, ious.size, "plural")
    nan = float("nan")
    result = {
        "ar": average_recall(ious),
        "ar_things": nan,
        "ar_stuff": nan,
        "ar_singulars": nan,
        "ar_plurals": nan,
        "acc_50": 100.0 * float(np.mean(ious > 0.5)) if ious.size else nan,
    }
    if isthing is not None:
        things = isthing | plural if plural is not None else isthing
        result["ar_things"] = average_recall(ious[things])
        result["ar_stuff"] = average_recall(ious[~things])
    if plural is not None:
        result["ar_singulars"] = average_recall(ious[~plural])
        result["ar_plurals"] = average_recall(ious[plural])
    return result


def pixel_accuracy_from_counts(intersection: np.ndarray, union: np.ndarray, num_pixels: np.ndarray) -> float:
    """Mean over masks of the fraction of pixels where prediction and ground truth agree, 0-100.

    Agreeing pixels = all pixels - (union - intersection). NaN for no masks.
    """
    num_pixels = np.asarray(num_pixels, dtype=np.float64).reshape(-1)
    if num_pixels.size == 0:
        return float("nan")
    agree = num_pixels - (np.asarray(union, dtype=np.float64) - np.asarray(intersection, dtype=np.float64))
    return 100.0 * float(np.mean(agree / num_pixels))


def png_metrics(pred_masks: Masks, gt_masks: Masks, isthing: Flags = None, plural: Flags = None) -> dict[str, float]:
    """:func:`png_average_recall` of the masks' IoUs plus ``pixel_acc`` (0-100)."""
    counts = mask_iou(pred_masks, gt_masks)
    result = png_average_recall(counts.iou, isthing=isthing, plural=plural)
    result["pixel_acc"] = pixel_accuracy_from_counts(counts.intersection, counts.union, counts.num_pixels)
    return result


# ----------------------------------------------------------------------------------------------
# Streaming, mergeable accumulator
# ----------------------------------------------------------------------------------------------
class MaskIoUAccumulator:
    """Accumulates per-mask pixel counts over batches; computes RES or PNG metrics at the end.

    Each process adds its batches; ``state_dict()`` is a small dict of int64 / bool numpy arrays
    (one entry per mask) that can be gathered once (e.g. ``accelerate.utils.gather_object``) and
    merged with :meth:`merge`. Merging concatenates in the given order, so shards merged in
    dataset order give exactly the numbers of a single process.

    Example::

        acc = MaskIoUAccumulator()
        for pred, gt in batches:
            acc.add(pred, gt)
        states = gather_object([acc.state_dict()])
        metrics = MaskIoUAccumulator.merge(states).compute_refer_seg()
    """

    _FIELDS = ("intersection", "union", "num_pixels", "isthing", "plural")

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {field: [] for field in self._FIELDS}

    def __len__(self) -> int:
        return int(sum(part.size for part in self._parts["intersection"]))

    def add(self, pred_masks: Masks, gt_masks: Masks, isthing: Flags = None, plural: Flags = None) -> MaskIoU:
        """Add a batch of masks (same input forms as :func:`mask_iou`); returns their counts.

        ``isthing``/``plural`` are per-mask flags for PNG; a missing flag is stored as False.
        """
        counts = mask_iou(pred_masks, gt_masks)
        n = counts.iou.size
        self._parts["intersection"].append(counts.intersection)
        self._parts["union"].append(counts.union)
        self._parts["num_pixels"].append(counts.num_pixels)
        for name, flags in (("isthing", isthing), ("plural", plural)):
            flags = _as_flag_vector(flags, n, name)
            self._parts[name].append(np.zeros(n, dtype=bool) if flags is None else flags)
        return counts

    def _field(self, name: str) -> np.ndarray:
        dtype = bool if name in ("isthing", "plural") else np.int64
        parts = self._parts[name]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The accumulated per-mask arrays (picklable, for gathering across processes)."""
        return {name: self._field(name) for name in self._FIELDS}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Append a state (from :meth:`state_dict`) after what is already accumulated."""
        sizes = {np.asarray(state[name]).size for name in self._FIELDS}
        if len(sizes) != 1:
            raise ValueError(f"inconsistent state: field sizes {sizes}")
        for name in self._FIELDS:
            self._parts[name].append(np.asarray(state[name]).reshape(-1))

    @classmethod
    def merge(cls, states: Sequence[dict[str, np.ndarray] | MaskIoUAccumulator]) -> MaskIoUAccumulator:
        """A new accumulator holding the given states/accumulators concatenated in order."""
        merged = cls()
        for state in states:
            merged.load_state_dict(state.state_dict() if isinstance(state, MaskIoUAccumulator) else state)
        return merged

    @property
    def ious(self) -> np.ndarray:
        """Per-mask IoU (float64, 0 for an empty union), in the order added."""
        return iou_from_counts(self._field("intersection"), self._field("union"))

    def compute_refer_seg(self) -> dict[str, float]:
        """``{"ciou", "miou"}`` (0-100) over everything added."""
        return refer_seg_metrics_from_counts(self._field("intersection"), self._field("union"))

    def compute_png(self) -> dict[str, float]:
        """:func:`png_average_recall` keys plus ``pixel_acc`` (0-100) over everything added."""
        result = png_average_recall(self.ious, isthing=self._field("isthing"), plural=self._field("plural"))
        result["pixel_acc"] = pixel_accuracy_from_counts(
            self._field("intersection"), self._field("union"), self._field("num_pixels")
        )
        return result
