#!/usr/bin/env python
"""Build a Panoptic Narrative Grounding (PNG) Parquet dataset (with a dataset card) from the original files.

Inputs: ``png_coco_{train,val}2017.json`` (narratives: ``image_id``, ``caption``, ``segments`` with
``utterance``, ``segment_ids``, ``plural``, ``noun``), COCO ``panoptic_{split}2017.json``, the
panoptic PNG folder and the COCO image folder. Output: ``<output-dir>/data/<split>-NNNNN.parquet``
with one row per narrative: the image, the caption and its segments (utterance, character span
in the caption, plural, isthing, segment ids and, for grounded segments, the union mask of those
panoptic segments as COCO RLE), plus ``README.md`` and ``build_summary.json``.

``isthing`` follows the original F-LMM evaluation: a plural segment counts as a thing; a singular
one takes its panoptic category's ``isthing``.

Example::

    python dataset_scripts/build_png.py --png-json data/png_coco_val2017.json \\
        --panoptic-json data/coco/annotations/panoptic_val2017.json \\
        --panoptic-dir data/coco/panoptic_val2017 --image-dir data/coco/val2017 \\
        --output-dir build/png
"""
from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from tqdm.auto import tqdm

from flmm_hf.datasets_io import (
    add_output_arguments,
    run_builder,
    BuildSummary,
    ShardedParquetWriter,
    check_image_file,
    check_inputs_outside_output,
    file_sha256,
    files_signature,
    image_cell,
    mask_to_rle,
    png_features,
    read_json_input,
    resolve_inside,
    start_build,
    write_dataset_card,
)

logger = logging.getLogger("build_png")

CITATION = """@inproceedings{gonzalez2021panoptic,
  title={Panoptic Narrative Grounding},
  author={Gonz{\\'a}lez, Cristina and Ayobi, Nicol{\\'a}s and Hern{\\'a}ndez, Isabela and Hern{\\'a}ndez, Jos{\\'e} and Pont-Tuset, Jordi and Arbel{\\'a}ez, Pablo},
  booktitle={ICCV}, year={2021}}
@inproceedings{kirillov2019panoptic,
  title={Panoptic Segmentation}, author={Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten and Doll{\\'a}r, Piotr},
  booktitle={CVPR}, year={2019}}"""


class SkipRecord(Exception):
    """A narrative that cannot be converted; ``reason`` is the summary category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--png-json", required=True, type=Path, help="png_coco_{train,val}2017.json")
    p.add_argument("--panoptic-json", required=True, type=Path, help="panoptic_{split}2017.json")
    p.add_argument("--panoptic-dir", required=True, type=Path, help="folder of panoptic PNGs")
    p.add_argument("--image-dir", required=True, type=Path, help="COCO images of that split")
    p.add_argument("--split", default=None, help="split name (default: 'train' or 'val' from the file name)")
    add_output_arguments(p)
    return p.parse_args(argv)


def infer_split(png_json: Path) -> str:
    """'train' / 'val' from a file name like ``png_coco_val2017.json``."""
    name = png_json.name.lower()
    if "train" in name:
        return "train"
    if "val" in name:
        return "val"
    raise SystemExit(f"cannot infer the split from {png_json.name}; pass --split")


def read_panoptic_png(path: Path) -> np.ndarray:
    """Panoptic PNG -> int64 id map (id = R + 256 G + 256^2 B, the COCO panoptic convention)."""
    rgb = np.asarray(PILImage.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def build(args: argparse.Namespace) -> BuildSummary:
    """Convert the files named in ``args``; returns the summary (also saved and printed)."""
    inputs = {"--png-json": args.png_json, "--panoptic-json": args.panoptic_json,
              "--panoptic-dir": args.panoptic_dir, "--image-dir": args.image_dir}
    check_inputs_outside_output(args.output_dir, inputs)  # before anything is read or written
    split = args.split or infer_split(args.png_json)
    summary = BuildSummary()

    records = read_json_input(args.png_json, "--png-json")
    panoptic = read_json_input(args.panoptic_json, "--panoptic-json")
    images = {img["id"]: img for img in panoptic["images"]}
    pan_anns = {ann["image_id"]: ann for ann in panoptic["annotations"]}
    isthing = {c["id"]: bool(c.get("isthing", 0)) for c in panoptic["categories"]}

    # What decides the rows: a resume is refused when any of it changed since the earlier run.
    fingerprint = {
        "--png-json sha256": file_sha256(args.png_json),
        "--panoptic-json sha256": file_sha256(args.panoptic_json),
        "--panoptic-dir files": files_signature(args.panoptic_dir, [a.get("file_name", "") for a in pan_anns.values()]),
        "--image-dir files": files_signature(args.image_dir, [img.get("file_name", "") for img in images.values()]),
        # with --no-embed-images the rows hold the images' absolute paths
        "--image-dir path": str(args.image_dir.resolve()) if args.no_embed_images else None,
    }
    manifest = start_build(args, "build_png", inputs, fingerprint)

    features = png_features()
    writer = ShardedParquetWriter(
        args.output_dir, split, features, key_column="narrative_id",
        max_rows_per_shard=args.max_rows_per_shard,
        max_bytes_per_shard=int(args.max_shard_mb * 1024 * 1024), manifest=manifest,
    )
    summary.already_present[split] = len(writer.existing_keys)
    budget = None if args.max_samples is None else max(0, args.max_samples - len(writer.existing_keys))
    seen: set[str] = set()  # narrative ids met in the input (not the earlier run's rows)
    # narratives of one image are usually adjacent: keep its id map (or why it has none) once read
    id_map_cache: tuple[int, np.ndarray | SkipRecord] | None = None
    image_checks: dict[int, str | None] = {}  # image id -> skip reason (None = fine), checked once
    with writer:
        for index, record in enumerate(tqdm(records, desc=f"png {split}", unit="narrative")):
            if budget is not None and writer.num_new >= budget:
                break
            key = str(record.get("narrative_id") or f"{record.get('image_id')}_{index}")
            if key in seen:  # the key is the narrative id: a second record would vanish unnoticed
                summary.skip("duplicate narrative_id", f"narrative {key}: the first record is kept")
                continue
            seen.add(key)
            if writer.has(key):
                continue
            try:
                image_id = _image_id(record)
                if id_map_cache is None or id_map_cache[0] != image_id:
                    id_map_cache = (image_id, _load_id_map(image_id, images, pan_anns, args))
                if isinstance(id_map_cache[1], SkipRecord):
                    raise SkipRecord(id_map_cache[1].reason, id_map_cache[1].detail)
                row = _record_to_row(
                    record, key, image_id, images, pan_anns, isthing, id_map_cache[1], args, image_checks
                )
            except SkipRecord as skip:
                summary.skip(skip.reason, f"narrative {key}: {skip.detail}")
                continue
            writer.write(row)
    summary.written[split] = writer.rows_written

    write_dataset_card(
        args.output_dir,
        pretty_name="Panoptic Narrative Grounding (COCO, Parquet)",
        features=features,
        description=(
            "Panoptic Narrative Grounding (PNG) narratives over COCO 2017 images with their panoptic "
            "ground truth. One row per narrative: the image, the caption and its segments in caption "
            "order, each with its character span (`caption[start:end] == utterance`), `plural`, "
            "`isthing` (plural segments count as things, as in the F-LMM evaluation), `noun`, the "
            "panoptic `segment_ids` and, for grounded segments, the union `mask` of those segments as "
            "COCO RLE (null for ungrounded segments). Images keep their Flickr licences; COCO "
            "annotations are CC BY 4.0."
        ),
        license="cc-by-4.0",
        citation=CITATION,
        build_command=" ".join(shlex.quote(a) for a in ["python", "dataset_scripts/build_png.py", *args.argv]),
        summary=summary,
        split_order=["train", "val"],
        tags=("panoptic-narrative-grounding", "referring-expression-segmentation"),
        manifest=manifest,
    )
    summary.save(args.output_dir, manifest)
    return summary


def _image_id(record: dict) -> int:
    """The record's image id as an int (the PNG files hold it as a string)."""
    try:
        return int(record["image_id"])
    except (KeyError, TypeError, ValueError):
        raise SkipRecord("bad image_id", repr(record.get("image_id"))) from None


def _load_id_map(image_id: int, images: dict, pan_anns: dict, args) -> np.ndarray | SkipRecord:
    """The panoptic id map of an image, or the :class:`SkipRecord` saying why it has none."""
    ann = pan_anns.get(image_id)
    if ann is None or image_id not in images:
        return SkipRecord("image not in panoptic json", f"image {image_id}")
    try:
        path = resolve_inside(args.panoptic_dir, ann.get("file_name"))
    except ValueError as err:
        return SkipRecord("panoptic png path outside --panoptic-dir", f"image {image_id}: {err}")
    if not path.is_file():
        return SkipRecord("panoptic png missing", str(ann.get("file_name")))
    try:
        return read_panoptic_png(path)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt PNG: skip its narratives, keep building
        return SkipRecord("panoptic png unreadable (truncated or corrupt)", f"{ann['file_name']}: {type(err).__name__}")


def _record_to_row(record, key, image_id, images, pan_anns, isthing, id_map, args, image_checks: dict) -> dict:
    """One narrative -> one row; raises :class:`SkipRecord` for anything incomplete."""
    caption = record.get("caption") or ""
    segments = record.get("segments") or []
    if not caption.strip() or not segments:
        raise SkipRecord("empty narrative", "no caption or no segments")
    image = images[image_id]  # present: _load_id_map checked it
    try:
        path = resolve_inside(args.image_dir, image.get("file_name"))
    except ValueError as err:
        raise SkipRecord("image path outside --image-dir", f"image {image_id}: {err}") from None
    height, width = int(image["height"]), int(image["width"])
    if image_id not in image_checks:  # decoding is the slow part; an image has several narratives
        image_checks[image_id] = check_image_file(path, height, width)
    if image_checks[image_id] is not None:
        raise SkipRecord(image_checks[image_id], str(image["file_name"]))
    if id_map.shape != (height, width):
        raise SkipRecord("panoptic png size differs from annotation", f"{id_map.shape} vs {(height, width)}")

    known = {s["id"]: s["category_id"] for s in pan_anns[image_id]["segments_info"]}
    present = set(np.unique(id_map).tolist())
    rows, cursor = [], 0
    for seg in segments:
        utterance = seg.get("utterance", "")
        # Utterances tile the caption in order; search from the cursor so repeats map correctly.
        start = caption.find(utterance, cursor) if utterance else -1
        if start < 0:
            raise SkipRecord("utterance not found in caption", repr(utterance))
        end = start + len(utterance)
        cursor = end
        ids = [int(s) for s in seg.get("segment_ids", [])]
        mask = None
        if ids:
            for sid in ids:
                if sid not in known:
                    raise SkipRecord("segment id not in panoptic annotation", f"id {sid} of {utterance!r}")
                if sid not in present:
                    raise SkipRecord("segment id absent from panoptic png", f"id {sid} of {utterance!r}")
            mask = mask_to_rle(np.isin(id_map, ids))
        plural = bool(seg.get("plural", False))
        rows.append(
            {
                "utterance": utterance,
                "start": start,
                "end": end,
                "segment_ids": ids,
                "plural": plural,
                # As in the original evaluation: plural -> thing; else the category's isthing.
                "isthing": bool(ids) and (plural or all(isthing.get(known[i], False) for i in ids)),
                "noun": bool(seg.get("noun", False)),
                "mask": mask,
            }
        )
    if not any(r["segment_ids"] for r in rows):
        raise SkipRecord("no grounded segment", "nothing to learn or evaluate")
    return {
        "image": image_cell(path, embed=not args.no_embed_images),
        "image_id": image_id,
        "narrative_id": key,
        "file_name": image["file_name"],
        "height": height,
        "width": width,
        "caption": caption,
        "segments": rows,
    }


def main(argv: list[str] | None = None) -> BuildSummary:
    return run_builder(parse_args, build, argv)


if __name__ == "__main__":
    main()
