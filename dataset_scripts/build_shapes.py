#!/usr/bin/env python
"""Build the synthetic shapes referring-segmentation set (the offline demo's data) as Parquet.

Same schema as the RefCOCO builder (one row per object: image, ids, category, sentences, bbox,
RLE mask), seeded and reproducible. Splits ``train`` / ``val`` / ``test`` use different seeds
derived from ``--seed`` and disjoint ids.

Example::

    python dataset_scripts/build_shapes.py --output-dir build/shapes --train-scenes 600
"""
from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from flmm_hf.datasets_io import (
    BuildSummary,
    ShardedParquetWriter,
    push_folder_to_hub,
    refcoco_features,
    split_num_rows,
    write_dataset_card,
)
from flmm_hf.shapes import generate_shapes_rows

SPLITS = ("train", "val", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--train-scenes", type=int, default=600)
    p.add_argument("--val-scenes", type=int, default=100)
    p.add_argument("--test-scenes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, choices=SPLITS, help="build only this split")
    p.add_argument("--max-samples", type=int, default=None, help="at most N rows per split")
    p.add_argument("--push-to-hub", default=None, metavar="REPO")
    p.add_argument("--max-rows-per-shard", type=int, default=5000)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> BuildSummary:
    """Generate and write the splits; returns the summary."""
    if args.overwrite and args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary = BuildSummary()
    features = refcoco_features()
    scenes = {"train": args.train_scenes, "val": args.val_scenes, "test": args.test_scenes}
    for k, split in enumerate(SPLITS):
        if args.split is not None and split != args.split:
            continue
        writer = ShardedParquetWriter(args.output_dir, split, features, "ref_id", args.max_rows_per_shard)
        summary.already_present[split] = len(writer.existing_keys)
        budget = None if args.max_samples is None else max(0, args.max_samples - len(writer.existing_keys))
        rows = generate_shapes_rows(scenes[split], seed=args.seed * 1000 + k, image_size=args.image_size,
                                    id_offset=(k + 1) * 1_000_000)
        with writer:
            for row in tqdm(rows, desc=f"shapes {split}", unit="ref"):
                if budget is not None and writer.num_new >= budget:
                    break
                writer.write(row)  # existing keys are ignored by the writer (resumable)
        summary.written[split] = writer.rows_written
    write_dataset_card(
        args.output_dir,
        pretty_name="F-LMM synthetic shapes (referring segmentation demo)",
        features=features,
        description=(
            "Synthetic scenes of a few non-overlapping coloured circles, squares and triangles on a grey "
            "background. One row per object, in the RefCOCO row schema: referring sentences "
            "(`the red circle`, `the red circle on the left`, `the circle that is red`), COCO xywh box "
            "and instance mask as COCO RLE. Generated, seeded and reproducible; for offline demos and "
            "tests only."
        ),
        license="apache-2.0",
        citation="@misc{flmm_hf_shapes, title={Synthetic shapes for the flmm-hf offline demo}}",
        build_command=" ".join(shlex.quote(a) for a in ["python", "dataset_scripts/build_shapes.py", *args.argv]),
        summary=summary,
        split_order=list(SPLITS),
        tags=("synthetic", "referring-expression-segmentation"),
    )
    summary.save(args.output_dir)
    return summary


def main(argv: list[str] | None = None) -> BuildSummary:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    summary = build(args)
    print(summary.report())
    print(split_num_rows(args.output_dir))
    if args.push_to_hub:
        print("pushed to", push_folder_to_hub(args.output_dir, args.push_to_hub))
    return summary


if __name__ == "__main__":
    main()
