"""Tests of flmm_hf.metrics and the evaluate modules wrapping it (issue 6, acceptance 1).

Values are checked against hand computations and against straightforward re-statements of the
original formulas: mmdet's RefSegMetric (cIoU/mIoU) and the PNG evaluation's explicit loop over
the thresholds np.arange(0, 1, 1e-5).
"""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from flmm_hf import metrics
from flmm_hf.metrics import (
    MaskIoUAccumulator,
    average_recall,
    mask_iou,
    metric_module_path,
    png_average_recall,
    png_metrics,
    recall_curve,
    refer_seg_metrics,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Independent references, written as plainly as the originals compute them
# ----------------------------------------------------------------------------------------------
def reference_average_recall(ious: np.ndarray) -> float:
    """The original PNG integration: recall at each threshold, then a left sum over the pairs."""
    ious = np.asarray(ious, dtype=np.float64)
    thresholds = np.arange(0, 1, 0.00001)
    recalls = []
    for t in thresholds:
        recalls.append(np.sum(ious >= t) / len(ious))
    total = 0.0
    for i in range(len(thresholds) - 1):
        total += abs(thresholds[i + 1] - thresholds[i]) * recalls[i]
    return 100.0 * total


def reference_refseg(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """mmdet RefSegMetric: per sample [K, H, W] masks, sums of I and U, float32 IoU, NaN -> 0."""
    cum_i, cum_u, iou_sum, count = 0, 0, 0.0, 0
    for pred, gt in samples:
        pred, gt = pred.bool(), gt.bool()
        i, u = pred & gt, pred | gt
        k = len(pred)
        iou = i.reshape(k, -1).sum(-1) * 1.0 / u.reshape(k, -1).sum(-1)
        iou = torch.nan_to_num(iou, nan=0.0)
        cum_i += int(i.sum())
        cum_u += int(u.sum())
        iou_sum += float(iou.sum())
        count += k
    return {"ciou": cum_i * 100 / cum_u, "miou": iou_sum * 100 / count}


def random_masks(rng: np.random.Generator, n: int, h: int, w: int, p: float = 0.5) -> np.ndarray:
    return rng.random((n, h, w)) < p


def mask(rows: list[str]) -> np.ndarray:
    """A boolean mask from strings of '0'/'1'."""
    return np.array([[c == "1" for c in row] for row in rows])


# ----------------------------------------------------------------------------------------------
# Per-mask counts and RES
# ----------------------------------------------------------------------------------------------
def test_mask_iou_hand_computed():
    pred = np.stack([mask(["110", "000"]), mask(["000", "000"]), mask(["111", "111"]), mask(["000", "000"])])
    gt = np.stack([mask(["011", "000"]), mask(["000", "000"]), mask(["111", "111"]), mask(["111", "000"])])
    out = mask_iou(pred, gt)
    np.testing.assert_array_equal(out.intersection, [1, 0, 6, 0])
    np.testing.assert_array_equal(out.union, [3, 0, 6, 3])
    np.testing.assert_array_equal(out.num_pixels, [6, 6, 6, 6])
    # partial, empty union (IoU 0), perfect, zero prediction
    np.testing.assert_allclose(out.iou, [1 / 3, 0.0, 1.0, 0.0])
    assert out.iou.dtype == np.float64


def test_refer_seg_hand_computed():
    pred = [mask(["1100"]), mask(["00", "00"]), mask(["111"]), mask(["0", "0"])]
    gt = [mask(["0110"]), mask(["00", "00"]), mask(["111"]), mask(["1", "1"])]
    # I = 1, 0, 3, 0 ; U = 3, 0, 3, 2
    out = refer_seg_metrics(pred, gt)
    assert out["ciou"] == pytest.approx(100 * 4 / 8)
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 0 + 1 + 0) / 4)


def test_refer_seg_perfect_zero_and_empty():
    rng = np.random.default_rng(0)
    gt = random_masks(rng, 4, 7, 9)
    assert refer_seg_metrics(gt, gt) == {"ciou": 100.0, "miou": 100.0}
    assert refer_seg_metrics(~gt, gt) == {"ciou": 0.0, "miou": 0.0}
    empty = np.zeros((3, 5, 5), dtype=bool)
    # every union empty: each IoU counts as 0, and so does the cumulative IoU
    assert refer_seg_metrics(empty, empty) == {"ciou": 0.0, "miou": 0.0}
    # empty gt with a non-empty prediction is a zero
    assert refer_seg_metrics(~empty, empty) == {"ciou": 0.0, "miou": 0.0}
    nothing = refer_seg_metrics([], [])
    assert np.isnan(nothing["ciou"]) and np.isnan(nothing["miou"])


def test_refer_seg_matches_mmdet_formula_mixed_sizes_and_types():
    rng = np.random.default_rng(1)
    sizes = [(13, 17, 1), (8, 8, 3), (21, 5, 2), (4, 30, 1)]  # (H, W, masks per sample)
    samples = []
    for h, w, k in sizes:
        gt = random_masks(rng, k, h, w, 0.3)
        pred = gt ^ random_masks(rng, k, h, w, 0.2)  # noisy copy
        samples.append((pred, gt))
    samples.append((np.zeros((1, 6, 6), bool), np.zeros((1, 6, 6), bool)))  # empty union
    expected = reference_refseg([(torch.from_numpy(p), torch.from_numpy(g)) for p, g in samples])

    preds, gts = [p for p, _ in samples], [g for _, g in samples]
    got_numpy = refer_seg_metrics(preds, gts)
    got_torch = refer_seg_metrics([torch.from_numpy(p) for p in preds], [torch.from_numpy(g) for g in gts])
    # one [H, W] mask per list item, and integer (0/1) masks
    flat_p = [m.astype(np.uint8) for p in preds for m in p]
    flat_g = [m for g in gts for m in g]
    got_flat = refer_seg_metrics(flat_p, flat_g)
    for got in (got_numpy, got_torch, got_flat):
        assert got["ciou"] == pytest.approx(expected["ciou"], rel=1e-6)
        assert got["miou"] == pytest.approx(expected["miou"], rel=1e-6)  # mmdet sums float32 IoUs
    assert got_numpy == got_torch == got_flat


def test_mask_iou_rejects_bad_input():
    with pytest.raises(TypeError):
        mask_iou(np.zeros((2, 3, 3), np.float32), np.zeros((2, 3, 3), bool))
    with pytest.raises(TypeError):
        mask_iou(torch.rand(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        mask_iou(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError):
        mask_iou([np.zeros((3, 3), bool)], [])


# ----------------------------------------------------------------------------------------------
# PNG average recall
# ----------------------------------------------------------------------------------------------
def test_average_recall_hand_computed():
    # perfect: recall 1 on every interval but the last threshold's -> 0.99999
    assert average_recall(np.ones(5)) == pytest.approx(99.999, abs=1e-9)
    # zero: recall 1 only at t = 0 (IoU 0 >= 0) -> one interval of 1e-5
    assert average_recall(np.zeros(5)) == pytest.approx(0.001, abs=1e-9)
    # half perfect, half zero: 1e-5 * 1 + 99998 * 1e-5 * 0.5 = 0.5
    assert average_recall([1.0, 0.0]) == pytest.approx(50.0, abs=1e-9)
    thresholds, recall = recall_curve([0.25, 0.75])
    assert len(thresholds) == len(recall) == 100000
    assert recall[0] == 1.0 and recall[50000] == 0.5 and recall[-1] == 0.0
    assert np.isnan(average_recall([]))


def test_average_recall_equals_original_loop():
    rng = np.random.default_rng(2)
    edge = [0.0, 1.0, 0.5, 0.2, 0.7, 0.99999, 1e-5, 0.3]  # values at or near thresholds
    for ious in (np.concatenate([rng.random(40), edge]), rng.random(7).astype(np.float32), np.array(edge)):
        assert average_recall(ious) == reference_average_recall(ious)  # same floats, same order


def test_png_average_recall_subgroups():
    ious = np.array([1.0, 0.0, 1.0, 0.0, 0.6, 0.5])
    isthing = np.array([1, 0, 0, 0, 1, 0], bool)
    plural = np.array([0, 0, 1, 0, 0, 0], bool)
    out = png_average_recall(ious, isthing=isthing, plural=plural)
    assert set(out) == set(metrics.PNG_KEYS)
    things = isthing | plural  # the plural phrase 2 is a thing although isthing says no
    assert out["ar"] == reference_average_recall(ious)
    assert out["ar_things"] == reference_average_recall(ious[things])
    assert out["ar_stuff"] == reference_average_recall(ious[~things])
    assert out["ar_singulars"] == reference_average_recall(ious[~plural])
    assert out["ar_plurals"] == pytest.approx(99.999, abs=1e-9)
    # stuff = IoUs 0, 0, 0.5: recall 1 at t = 0, 1/3 on the 50000 thresholds in (0, 0.5], then 0
    assert out["ar_stuff"] == pytest.approx(100 * (1e-5 + 50000 * 1e-5 / 3), abs=1e-9)
    assert out["acc_50"] == pytest.approx(100 * 3 / 6)  # 0.5 itself does not count (IoU > 0.5)
    # torch and list inputs give the same
    assert png_average_recall(torch.tensor(ious), torch.tensor(isthing), torch.tensor(plural)) == out
    assert png_average_recall(list(ious), list(isthing), list(plural)) == out


def test_png_average_recall_missing_and_empty_groups():
    out = png_average_recall([0.9, 0.1])
    assert not np.isnan(out["ar"])
    assert all(np.isnan(out[k]) for k in ("ar_things", "ar_stuff", "ar_singulars", "ar_plurals"))
    out = png_average_recall([0.9, 0.1], isthing=[True, True], plural=[False, False])
    assert np.isnan(out["ar_stuff"]) and np.isnan(out["ar_plurals"])
    assert out["ar_things"] == out["ar"] == out["ar_singulars"]
    with pytest.raises(ValueError):
        png_average_recall([0.5, float("nan")])
    with pytest.raises(ValueError):
        png_average_recall([0.5, 0.4], isthing=[True])


def test_png_metrics_from_masks():
    pred = [mask(["1100"]), mask(["00", "00"]), mask(["111"])]
    gt = [mask(["0110"]), mask(["00", "00"]), mask(["011"])]
    out = png_metrics(pred, gt, isthing=[True, False, True], plural=[False, False, True])
    ious = np.array([1 / 3, 0.0, 2 / 3])
    assert out["ar"] == pytest.approx(reference_average_recall(ious), abs=1e-9)
    assert out["acc_50"] == pytest.approx(100 / 3)
    # agreeing pixels: 2/4, 4/4, 2/3
    assert out["pixel_acc"] == pytest.approx(100 * (0.5 + 1.0 + 2 / 3) / 3)


# ----------------------------------------------------------------------------------------------
# Streaming accumulator
# ----------------------------------------------------------------------------------------------
def _batches(seed: int):
    rng = np.random.default_rng(seed)
    batches = []
    for h, w, k in [(9, 11, 2), (5, 5, 1), (12, 7, 3), (9, 11, 1), (6, 6, 2)]:
        gt = random_masks(rng, k, h, w, 0.4)
        pred = gt ^ random_masks(rng, k, h, w, 0.3)
        batches.append((pred, gt, rng.random(k) < 0.5, rng.random(k) < 0.3))
    batches.append((np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool), np.array([False]), np.array([False])))
    return batches


def test_accumulator_equals_one_shot_and_merges():
    batches = _batches(3)
    full = MaskIoUAccumulator()
    for pred, gt, isthing, plural in batches:
        full.add(torch.from_numpy(pred), torch.from_numpy(gt), isthing=isthing, plural=plural)
    assert len(full) == sum(len(b[0]) for b in batches)

    preds, gts = [b[0] for b in batches], [b[1] for b in batches]
    isthing, plural = np.concatenate([b[2] for b in batches]), np.concatenate([b[3] for b in batches])
    assert full.compute_refer_seg() == refer_seg_metrics(preds, gts)
    assert full.compute_png() == png_metrics(preds, gts, isthing=isthing, plural=plural)

    # two "processes" with contiguous shards, states gathered (pickled) and merged in order
    shard_a, shard_b = MaskIoUAccumulator(), MaskIoUAccumulator()
    for i, (pred, gt, t, p) in enumerate(batches):
        (shard_a if i < 2 else shard_b).add(pred, gt, isthing=t, plural=p)
    states = [pickle.loads(pickle.dumps(s.state_dict())) for s in (shard_a, shard_b)]
    merged = MaskIoUAccumulator.merge(states)
    assert merged.compute_refer_seg() == full.compute_refer_seg()
    assert merged.compute_png() == full.compute_png()
    for key, value in full.state_dict().items():
        np.testing.assert_array_equal(merged.state_dict()[key], value)
    # a different order still gives the same numbers up to float summation order
    swapped = MaskIoUAccumulator.merge([shard_b, shard_a])
    assert swapped.compute_refer_seg()["miou"] == pytest.approx(full.compute_refer_seg()["miou"], rel=1e-12)
    assert swapped.compute_refer_seg()["ciou"] == full.compute_refer_seg()["ciou"]

    empty = MaskIoUAccumulator()
    assert np.isnan(empty.compute_refer_seg()["miou"]) and len(empty) == 0


# ----------------------------------------------------------------------------------------------
# evaluate modules (offline, from the local path) and packaging
# ----------------------------------------------------------------------------------------------
def test_evaluate_modules_load_offline_and_agree(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    batches = _batches(4)
    preds = [m for b in batches for m in b[0]]  # one [H, W] mask per expression, mixed sizes
    gts = [m for b in batches for m in b[1]]
    isthing = [bool(x) for b in batches for x in b[2]]
    plural = [bool(x) for b in batches for x in b[3]]

    refer_seg = evaluate.load(metric_module_path("refer_seg"), keep_in_memory=True, cache_dir=str(tmp_path))
    assert refer_seg.compute(predictions=preds, references=gts) == refer_seg_metrics(preds, gts)
    # the folder path works too, and streaming with add_batch gives the same numbers
    folder = str(Path(metric_module_path("refer_seg")).parent)
    streamed = evaluate.load(folder, keep_in_memory=True, cache_dir=str(tmp_path))
    streamed.add_batch(predictions=preds[:3], references=gts[:3])
    streamed.add_batch(predictions=preds[3:], references=gts[3:])
    assert streamed.compute() == refer_seg_metrics(preds, gts)

    png = evaluate.load(metric_module_path("png_recall"), keep_in_memory=True, cache_dir=str(tmp_path))
    got = png.compute(predictions=preds, references=gts, isthing=isthing, plural=plural)
    assert got == png_metrics(preds, gts, isthing=isthing, plural=plural)

    png_ious = evaluate.load(metric_module_path("png_recall"), "ious", keep_in_memory=True, cache_dir=str(tmp_path))
    ious = mask_iou(preds, gts).iou
    got = png_ious.compute(ious=list(ious), isthing=isthing, plural=plural)
    assert got == png_average_recall(ious, isthing=isthing, plural=plural)


def test_metric_modules_ship_in_package():
    setuptools = pytest.importorskip("setuptools")
    packages = setuptools.find_packages(str(REPO_ROOT), include=["flmm_hf", "flmm_hf.*"])
    for name in ("refer_seg", "png_recall"):
        assert f"flmm_hf.metric_modules.{name}" in packages
        assert Path(metric_module_path(name)).is_file()
    with pytest.raises(FileNotFoundError):
        metric_module_path("no_such_metric")
