"""A synthetic referring-segmentation set for the offline demo.

Each scene is a plain background with a few coloured circles, squares and triangles that do not
overlap; each object is one "ref" with referring expressions such as ``"the red circle"``,
``"the red circle on the left"`` and ``"the circle that is red"``, and its instance mask. Rows use
exactly the RefCOCO schema (:func:`flmm_hf.datasets_io.refcoco_features`), so the same transform,
collator, training and evaluation code serve both.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same bytes.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .datasets_io import mask_to_rle, refcoco_features

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ["circle", "square", "triangle"]
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(SHAPES)}
BACKGROUND = (128, 128, 128)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape of 'radius' r centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # upward triangle inscribed in the circle of radius r
        draw.polygon([(cx, cy - r), (cx - r * 0.87, cy + r * 0.5), (cx + r * 0.87, cy + r * 0.5)], fill=fill)


def _position_word(cx: float, all_cx: list[float]) -> str:
    """'left' / 'right' / 'middle' by the object's rank among the scene's objects along x."""
    order = sorted(all_cx)
    rank = order.index(cx)
    if rank == 0:
        return "left"
    if rank == len(order) - 1:
        return "right"
    return "middle"


def generate_scene(rng: np.random.Generator, image_size: int = 224, min_objects: int = 2, max_objects: int = 4):
    """One scene: (RGB image, list of objects ``{colour, shape, mask, bbox, cx}``).

    (colour, shape) pairs are unique within a scene so that "the red circle" is unambiguous;
    objects are placed by rejection sampling so they do not overlap.
    """
    n = int(rng.integers(min_objects, max_objects + 1))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for colour, shape in chosen:
        for _ in range(100):
            r = float(rng.uniform(0.08, 0.16) * image_size)
            cx = float(rng.uniform(r + 1, image_size - r - 1))
            cy = float(rng.uniform(r + 1, image_size - r - 1))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in placed):
                break
        else:
            continue  # scene too crowded for this object; keep the others
        placed.append((cx, cy, r))
        mask_img = Image.new("L", (image_size, image_size), 0)
        _draw(ImageDraw.Draw(mask_img), shape, cx, cy, r, 255)
        _draw(draw, shape, cx, cy, r, COLOURS[colour])
        mask = np.asarray(mask_img) > 127
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        objects.append({"colour": colour, "shape": shape, "mask": mask, "bbox": bbox, "cx": cx})
    return image, objects


def generate_shapes_rows(
    num_scenes: int, seed: int = 0, image_size: int = 224, id_offset: int = 0
) -> Iterator[dict]:
    """Rows (RefCOCO schema, one per object) of ``num_scenes`` scenes, reproducible from ``seed``.

    ``id_offset`` keeps image/ref ids of different splits disjoint.
    """
    rng = np.random.default_rng(seed)
    ref_id = id_offset * 10
    for scene in range(num_scenes):
        image, objects = generate_scene(rng, image_size)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image_id = id_offset + scene
        all_cx = [o["cx"] for o in objects]
        for obj in objects:
            c, s = obj["colour"], obj["shape"]
            pos = _position_word(obj["cx"], all_cx)
            sentences = [f"the {c} {s}", f"the {c} {s} on the {pos}", f"the {s} that is {c}"]
            yield {
                "image": {"bytes": buf.getvalue(), "path": f"shapes_{image_id:08d}.png"},
                "image_id": image_id,
                "file_name": f"shapes_{image_id:08d}.png",
                "height": image_size,
                "width": image_size,
                "ref_id": ref_id,
                "ann_id": ref_id,
                "category_id": CATEGORY_IDS[s],
                "category": s,
                "sentences": sentences,
                "raw_sentences": list(sentences),
                "sent_ids": [ref_id * 3 + k for k in range(3)],
                "bbox": obj["bbox"],
                "mask": mask_to_rle(obj["mask"]),
            }
            ref_id += 1


def make_shapes_dataset(num_scenes: int, seed: int = 0, image_size: int = 224, id_offset: int = 0):
    """The shapes set as an in-memory ``datasets.Dataset`` (for the demo; no files written)."""
    from datasets import Dataset

    features = refcoco_features()
    rows = list(generate_shapes_rows(num_scenes, seed, image_size, id_offset))
    return Dataset.from_list([features.encode_example(r) for r in rows], features=features)
