"""The offline demo around training: its data, its frozen backbone, its baseline and its picture.

`python train.py` with no argument trains F-LMM's head on a synthetic shapes set
(:mod:`flmm_hf.shapes`) over a small LLaVA built from configs and pre-trained on captions of the
training scenes (:mod:`flmm_hf.demo_backbone`), then compares the held-out IoU with a trivial
baseline. This module joins those pieces to the training arguments, and draws predictions over
their images (``predictions.png``, written for real runs too).

Library-only module (not part of the Hub custom code).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .evaluation import MaskPrediction
    from .training import DataArguments, ModelArguments

#: Colours of the predicted masks in the overlay picture, one per phrase of an image.
PALETTE = [(255, 0, 0), (0, 200, 255), (255, 200, 0), (0, 255, 0), (255, 0, 255), (255, 128, 0)]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def shapes_datasets(data_args: DataArguments):
    """The shapes scenes in concat mode (one row per scene, all its objects): training and held-out.

    The held-out scenes are drawn with seed ``shapes_seed + 1`` and ids after the training ones;
    ``max_eval_samples`` truncates them.
    """
    from .data import group_refs_by_image
    from .shapes import make_shapes_dataset

    train = make_shapes_dataset(data_args.shapes_train_scenes, seed=data_args.shapes_seed, image_size=data_args.shapes_image_size)
    held_out = make_shapes_dataset(
        data_args.shapes_eval_scenes,
        seed=data_args.shapes_seed + 1,
        image_size=data_args.shapes_image_size,
        id_offset=10 * (data_args.shapes_train_scenes + 1),
    )
    train = group_refs_by_image(train, keep_in_memory=True)
    held_out = group_refs_by_image(held_out, keep_in_memory=True)
    if data_args.max_eval_samples is not None:
        held_out = held_out.select(range(min(data_args.max_eval_samples, len(held_out))))
    return train, held_out


def _examples(dataset, sentence_field: str = "raw_sentences") -> Iterator[dict[str, Any]]:
    """The evaluation view of every row (first sentence per ref): image, text, phrases, masks."""
    from .data import FLMMTransform

    transform = FLMMTransform(train=False, sentence_field=sentence_field)
    for i in range(len(dataset)):
        yield transform.example(dataset[i])


# ---------------------------------------------------------------------------------------------
# The frozen backbone
# ---------------------------------------------------------------------------------------------
def demo_backbone_folder(model_args: ModelArguments, output_dir: str | os.PathLike) -> Path:
    """Where the demo backbone is cached: ``demo_backbone_dir``, else ``<output_dir>/backbone``."""
    return Path(model_args.demo_backbone_dir or os.path.join(output_dir, "backbone"))


def build_demo_backbone_for(
    model_args: ModelArguments, train_dataset, output_dir: str | os.PathLike, progress: bool = True
):
    """The demo's frozen LLaVA: loaded from its cache folder when complete, or built and pre-trained on
    captions of the training scenes (``demo_pretrain_steps`` steps; 0 gives a random frozen backbone) and
    saved there. ``progress``: show the pre-training's progress bar.

    Returns:
        ``(model, LlavaProcessor, stats)``; ``stats`` holds the pre-training's steps, time and losses.
    """
    from .data import FLMMTransform
    from .demo_backbone import DemoBackboneArguments, PretrainArguments, load_cached_demo_backbone, load_or_pretrain_demo_backbone

    folder = demo_backbone_folder(model_args, output_dir).resolve()
    backbone_args = DemoBackboneArguments(image_size=model_args.demo_image_size, patch_size=model_args.demo_patch_size)
    cached = load_cached_demo_backbone(folder, backbone_args)
    if cached is not None:
        return (*cached, {"pretrain_cached": 1})
    scenes, words = [], set()
    transform = FLMMTransform(train=False)
    for i in range(len(train_dataset)):
        row = train_dataset[i]
        words.update(s for per_ref in row["raw_sentences"] for s in per_ref)
        example = transform.example(row)
        expressions = [example["text"][s:e] for s, e in example["phrases"]]
        scenes.append((example["image"], expressions, [m.numpy() for m in example["masks"]]))
    return load_or_pretrain_demo_backbone(
        folder,
        scenes=scenes,
        backbone_args=backbone_args,
        pretrain_args=PretrainArguments(
            steps=model_args.demo_pretrain_steps,
            batch_size=model_args.demo_pretrain_batch_size,
            learning_rate=model_args.demo_pretrain_learning_rate,
            max_seconds=model_args.demo_pretrain_max_seconds,
            seed=0,
        ),
        words=sorted(words),
        progress=progress,
    )


def demo_backbone_reference(model_args: ModelArguments, output_dir: str | os.PathLike) -> str:
    """The backbone's name for the saved F-LMM config: relative to the model folder when the cache
    lies inside it (so that the saved demo can be moved or copied), else the absolute folder."""
    backbone = demo_backbone_folder(model_args, output_dir).resolve()
    output = Path(output_dir).resolve()
    return backbone.relative_to(output).as_posix() if backbone.is_relative_to(output) else str(backbone)


# ---------------------------------------------------------------------------------------------
# The trivial baseline
# ---------------------------------------------------------------------------------------------
def mean_mask_baseline(train_dataset, eval_dataset, size: int = 64) -> dict[str, float]:
    """
    The trivial baseline: every phrase gets the same mask, the mean training mask (in normalised
    image coordinates) thresholded at the level that maximises the training mIoU. Returns mIoU/cIoU
    (0-100) on `eval_dataset`.
    """
    from .metrics import MaskIoUAccumulator

    def normalised(masks: torch.Tensor) -> torch.Tensor:
        return F.interpolate(masks[:, None].float(), size=(size, size), mode="area")[:, 0]

    train_masks = torch.cat([normalised(ex["masks"]) for ex in _examples(train_dataset)])
    mean = train_masks.mean(0)
    best, best_threshold = -1.0, 0.5
    binary_train = train_masks > 0.5
    for threshold in torch.linspace(0.02, 0.5, 25).tolist():
        pred = mean > threshold
        inter = (binary_train & pred).flatten(1).sum(1).float()
        union = (binary_train | pred).flatten(1).sum(1).float()
        miou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union)).mean().item()
        if miou > best:
            best, best_threshold = miou, threshold
    accumulator = MaskIoUAccumulator()
    for ex in _examples(eval_dataset):
        gt = ex["masks"]
        h, w = gt.shape[-2:]
        prob = F.interpolate(mean[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        accumulator.add((prob > best_threshold)[None].expand(gt.shape[0], h, w).clone(), gt)
    return accumulator.compute_refer_seg()


# ---------------------------------------------------------------------------------------------
# The overlay picture
# ---------------------------------------------------------------------------------------------
#: Width of one overlay tile at least, so that legend lines of small images stay readable.
MIN_TILE_WIDTH = 200


@dataclass
class LegendLine:
    """One line of an overlay tile's legend, in canvas pixels (boxes are ``(x0, y0, x1, y1)``, exclusive ends)."""

    tile: int  # index of the image
    text: str  # the text as drawn (shortened with "..." to fit the tile)
    text_box: tuple[int, int, int, int]  # the drawn text's ink box
    swatch: tuple[int, int, int, int] | None  # the colour swatch (None for the caption line)
    colour: tuple[int, int, int] | None


@dataclass
class OverlayLayout:
    """Where :func:`save_overlay` drew what: the canvas size, each tile's box and every legend line."""

    size: tuple[int, int]  # (width, height) of the picture
    tiles: list[tuple[int, int, int, int]] = field(default_factory=list)
    legend: list[LegendLine] = field(default_factory=list)
    legend_top: list[int] = field(default_factory=list)  # per tile: canvas y where its legend starts


def _fit(draw, text: str, font, width: float) -> str:
    """``text`` cut (with "...") so that it is at most ``width`` pixels wide in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _paint_masks(image, masks: torch.Tensor, outline: bool) -> np.ndarray:
    """``image`` with each mask blended in its `PALETTE` colour (and its outline in white if asked)."""
    out = np.asarray(image.convert("RGB")).astype(np.float32)
    for k in range(masks.shape[0]):
        colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
        m = masks[k].numpy().astype(bool)
        out[m] = 0.45 * out[m] + 0.55 * colour
        if outline:
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            out[edge] = 255
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(
    images: Sequence[Any],
    predictions: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    path: str | os.PathLike,
    texts: Sequence[str] | None = None,
    columns: int = 4,
    phrases: Sequence[Sequence[str]] | None = None,
) -> OverlayLayout | None:
    """Draw predictions beside their ground truth, one tile per image, ``columns`` tiles per row.

    Each tile holds the predicted masks (``[K, H, W]`` bool per image) blended over the image on the
    left and the ground-truth masks (same colours, white outlines) on the right, each titled, and
    below them a legend: the text (if given) on its own line, then one line per phrase with its
    `PALETTE` colour swatch and the phrase (``phrases``, else ``phrase k``). Legend lines are
    stacked, never overlap and are shortened with "..." to stay inside the tile.

    Returns:
        The :class:`OverlayLayout` (what was drawn where), or None when there is no image (nothing
        is written then).
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(images) == 0:
        return None
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ascent = probe.textbbox((0, 0), "Ag|", font=font)
    line_height = ascent[3] - min(ascent[1], 0) + 4  # ink height plus a gap: lines never touch
    margin, gap = 4, 4
    panel_w = max(image.width for image in images)
    panel_h = max(image.height for image in images)
    tile_w = max(2 * panel_w + 3 * gap, MIN_TILE_WIDTH)  # a gap left of, between and right of the panels
    title_h = line_height
    counts = [int(pred.shape[0]) for pred in predictions]
    legend_lines = max(c + (texts is not None) for c in counts)
    tile_h = title_h + panel_h + margin + legend_lines * line_height + margin
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (tile_w * min(columns, len(images)), tile_h * rows), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    layout = OverlayLayout(size=canvas.size)
    for i, (image, pred, gt) in enumerate(zip(images, predictions, targets)):
        x0, y0 = (i % columns) * tile_w, (i // columns) * tile_h
        layout.tiles.append((x0, y0, x0 + tile_w, y0 + tile_h))
        pred_x, gt_x = x0 + gap, x0 + panel_w + 2 * gap
        for label, x in (("prediction", pred_x), ("ground truth", gt_x)):
            draw.text((x + 2, y0 + 1), _fit(draw, label, font, panel_w - 4), fill=(255, 255, 255), font=font)
        canvas.paste(Image.fromarray(_paint_masks(image, pred, outline=False)), (pred_x, y0 + title_h))
        canvas.paste(Image.fromarray(_paint_masks(image, gt, outline=True)), (gt_x, y0 + title_h))
        y = y0 + title_h + panel_h + margin
        layout.legend_top.append(y)
        entries: list[tuple[str, tuple[int, int, int] | None]] = []
        if texts is not None:
            entries.append((texts[i], None))
        names = list(phrases[i]) if phrases is not None else []
        for k in range(pred.shape[0]):
            entries.append((names[k] if k < len(names) else f"phrase {k}", PALETTE[k % len(PALETTE)]))
        for text, colour in entries:
            swatch = None
            text_x = x0 + margin
            if colour is not None:
                side = line_height - 6
                swatch = (x0 + margin, y + 2, x0 + margin + side, y + 2 + side)
                draw.rectangle([swatch[0], swatch[1], swatch[2] - 1, swatch[3] - 1], fill=colour)
                text_x = swatch[2] + margin
            shown = _fit(draw, " ".join(text.split()), font, x0 + tile_w - margin - text_x)
            draw.text((text_x, y), shown, fill=(255, 255, 255), font=font)
            box = tuple(int(v) for v in draw.textbbox((text_x, y), shown, font=font))
            layout.legend.append(LegendLine(i, shown, box, swatch, colour))
            y += line_height
    canvas.save(path)
    return layout


def save_prediction_overlay(dataset, predictions: Sequence[MaskPrediction], path: str | os.PathLike,
                            sentence_field: str = "raw_sentences") -> OverlayLayout | None:
    """:func:`save_overlay` of evaluation predictions (``flmm_hf.evaluation.MaskPrediction``, as
    ``FLMMTrainer.evaluate_with_predictions`` keeps them) over their rows of `dataset`, each phrase
    named in the legend."""
    from .data import FLMMTransform

    transform = FLMMTransform(train=False, sentence_field=sentence_field)
    examples = [transform.example(dataset[p.index]) for p in predictions]
    return save_overlay(
        [e["image"] for e in examples], [p.masks for p in predictions], [p.targets for p in predictions], path,
        phrases=[[e["text"][start:end] for start, end in e["phrases"]] for e in examples],
    )
