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
import shlex
from pathlib import Path

from tqdm.auto import tqdm

from flmm_hf.datasets_io import (
    add_output_arguments,
    run_builder,
    BuildSummary,
    ShardedParquetWriter,
    file_sha256,
    refcoco_features,
    start_build,
    write_dataset_card,
)
from flmm_hf import shapes
from flmm_hf.shapes import generate_shapes_rows

SPLITS = ("train", "val", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-scenes", type=int, default=600)
    p.add_argument("--val-scenes", type=int, default=100)
    p.add_argument("--test-scenes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, choices=SPLITS, help="build only this split")
    add_output_arguments(p, embed_images=False)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> BuildSummary:
    """Generate and write the splits; returns the summary."""
    # What decides the rows (the generator's code included): a resume is refused when any changed.
    fingerprint = {
        "--train-scenes": args.train_scenes,
        "--val-scenes": args.val_scenes,
        "--test-scenes": args.test_scenes,
        "--image-size": args.image_size,
        "--seed": args.seed,
        "generator sha256": file_sha256(Path(shapes.__file__)),
    }
    manifest = start_build(args, "build_shapes", {}, fingerprint)
    summary = BuildSummary()
    features = refcoco_features()
    scenes = {"train": args.train_scenes, "val": args.val_scenes, "test": args.test_scenes}
    for k, split in enumerate(SPLITS):
        if args.split is not None and split != args.split:
            continue
        writer = ShardedParquetWriter(
            args.output_dir, split, features, key_column="ref_id", max_rows_per_shard=args.max_rows_per_shard,
            max_bytes_per_shard=int(args.max_shard_mb * 1024 * 1024), manifest=manifest,
        )
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
        manifest=manifest,
    )
    summary.save(args.output_dir, manifest)
    return summary


def main(argv: list[str] | None = None) -> BuildSummary:
    return run_builder(parse_args, build, argv)


if __name__ == "__main__":
    main()
