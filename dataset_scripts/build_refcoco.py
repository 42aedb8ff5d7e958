#!/usr/bin/env python
"""Build a RefCOCO / RefCOCO+ / RefCOCOg Parquet dataset (with a dataset card) from the original files.

Inputs are the files of the original releases (https://github.com/lichengunc/refer):
``instances.json`` (COCO-style images + annotations with polygons), ``refs(unc).p`` or
``refs(umd).p`` (the refs, a Python 2 pickle, read with a restricted unpickler) and the COCO
train2014 image folder. Output: ``<output-dir>/data/<split>-NNNNN.parquet`` with one row per ref
(image, ids, category, all sentences, bbox, instance mask as COCO RLE), ``README.md`` and
``build_summary.json``. Load it with ``datasets.load_dataset(<output-dir>)``.

Example::

    python dataset_scripts/build_refcoco.py --dataset refcoco \\
        --instances data/refcoco/instances.json --refs "data/refcoco/refs(unc).p" \\
        --image-dir data/coco/train2014 --output-dir build/refcoco

Re-running resumes: refs already in finished shards are not written again, provided the inputs
and arguments are those of the earlier run (a fingerprint in ``build_manifest.json`` says);
otherwise it stops and asks for ``--overwrite``, which deletes only the files that build wrote.
"""
from __future__ import annotations

import argparse
import logging
import shlex
from collections import OrderedDict
from pathlib import Path

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
    load_refs_pickle,
    read_json_input,
    refcoco_features,
    resolve_inside,
    rle_area,
    segmentation_to_rle,
    start_build,
    write_dataset_card,
)

logger = logging.getLogger("build_refcoco")

SPLIT_ORDER = ["train", "val", "testA", "testB", "test"]
PRETTY = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}
CITATIONS = {
    "refcoco": """@inproceedings{kazemzadeh2014referitgame,
  title={ReferItGame: Referring to Objects in Photographs of Natural Scenes},
  author={Kazemzadeh, Sahar and Ordonez, Vicente and Matten, Mark and Berg, Tamara},
  booktitle={EMNLP}, year={2014}}
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C and Berg, Tamara L},
  booktitle={ECCV}, year={2016}}""",
    "refcocog": """@inproceedings{mao2016generation,
  title={Generation and Comprehension of Unambiguous Object Descriptions},
  author={Mao, Junhua and Huang, Jonathan and Toshev, Alexander and Camburu, Oana and Yuille, Alan L and Murphy, Kevin},
  booktitle={CVPR}, year={2016}}
@inproceedings{nagaraja2016modeling,
  title={Modeling Context Between Objects for Referring Expression Understanding},
  author={Nagaraja, Varun K and Morariu, Vlad I and Davis, Larry S},
  booktitle={ECCV}, year={2016}}""",
}
CITATIONS["refcoco+"] = CITATIONS["refcoco"]
COCO_CITATION = """@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and others}, booktitle={ECCV}, year={2014}}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(PRETTY))
    p.add_argument("--instances", required=True, type=Path, help="instances.json of the variant")
    p.add_argument("--refs", required=True, type=Path, help="refs(unc).p / refs(umd).p")
    p.add_argument("--image-dir", required=True, type=Path, help="COCO train2014 images")
    p.add_argument("--split", default=None, help="build only this split (default: all in the refs file)")
    add_output_arguments(p)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> BuildSummary:
    """Convert the files named in ``args``; returns the summary (also saved and printed)."""
    inputs = {"--instances": args.instances, "--refs": args.refs, "--image-dir": args.image_dir}
    check_inputs_outside_output(args.output_dir, inputs)  # before anything is read or written
    summary = BuildSummary()

    instances = read_json_input(args.instances, "--instances")
    images = {img["id"]: img for img in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    categories = {c["id"]: c["name"] for c in instances.get("categories", [])}
    refs = load_refs_pickle(args.refs)

    # What decides the rows: a resume is refused when any of it changed since the earlier run.
    used_images = {ref.get("image_id") for ref in refs}
    fingerprint = {
        "--dataset": args.dataset,
        "--instances sha256": file_sha256(args.instances),
        "--refs sha256": file_sha256(args.refs),
        "--image-dir files": files_signature(
            args.image_dir, [img.get("file_name", "") for i, img in images.items() if i in used_images]
        ),
        # with --no-embed-images the rows hold the images' absolute paths
        "--image-dir path": str(args.image_dir.resolve()) if args.no_embed_images else None,
    }
    manifest = start_build(args, "build_refcoco", inputs, fingerprint)

    # Group refs by split, keeping file order (deterministic output, so resuming is well defined).
    by_split: "OrderedDict[str, list[dict]]" = OrderedDict()
    for ref in refs:
        split = str(ref.get("split", "train"))
        if args.split is None or split == args.split:
            by_split.setdefault(split, []).append(ref)
    if args.split is not None and not by_split:
        summary.skip("requested split not in refs file", f"split {args.split!r}")

    features = refcoco_features()
    sizes_checked: dict[int, str | None] = {}  # image id -> error (None = fine), checked once
    for split, split_refs in by_split.items():
        writer = ShardedParquetWriter(
            args.output_dir, split, features, key_column="ref_id",
            max_rows_per_shard=args.max_rows_per_shard,
            max_bytes_per_shard=int(args.max_shard_mb * 1024 * 1024), manifest=manifest,
        )
        summary.already_present[split] = len(writer.existing_keys)
        budget = None if args.max_samples is None else max(0, args.max_samples - len(writer.existing_keys))
        seen: set[int] = set()  # ref ids met in this split's input (not the earlier run's rows)
        with writer:
            for ref in tqdm(split_refs, desc=f"{args.dataset} {split}", unit="ref"):
                if budget is not None and writer.num_new >= budget:
                    break
                ref_id = int(ref["ref_id"])
                if ref_id in seen:  # the key is the ref id: a second record would vanish unnoticed
                    summary.skip("duplicate ref_id in split", f"ref {ref_id} in {split}: the first record is kept")
                    continue
                seen.add(ref_id)
                if writer.has(ref_id):
                    continue
                row = _ref_to_row(ref, images, anns, categories, args, summary, sizes_checked)
                if row is not None:
                    writer.write(row)
        summary.written[split] = writer.rows_written

    write_dataset_card(
        args.output_dir,
        pretty_name=f"{PRETTY[args.dataset]} (referring expression segmentation, Parquet)",
        features=features,
        description=(
            f"{PRETTY[args.dataset]} converted from the original `instances.json` and refs pickle of "
            "https://github.com/lichengunc/refer. One row per referred object (ref): the COCO train2014 "
            "image, image/ref/annotation ids, category, all referring sentences (`sentences`: the "
            "tokenised `sent` strings; `raw_sentences`: the annotators' raw text), the COCO xywh `bbox` "
            "and the instance `mask` as COCO RLE. Images keep their Flickr licences; annotations are "
            "CC BY 4.0 (COCO); the RefCOCO releases carry no licence file of their own."
        ),
        license="cc-by-4.0",
        citation=CITATIONS[args.dataset] + "\n" + COCO_CITATION,
        build_command=" ".join(shlex.quote(a) for a in ["python", "dataset_scripts/build_refcoco.py", *args.argv]),
        summary=summary,
        split_order=SPLIT_ORDER,
        manifest=manifest,
    )
    summary.save(args.output_dir, manifest)
    return summary


def _ref_to_row(ref, images, anns, categories, args, summary: BuildSummary, sizes_checked) -> dict | None:
    """One ref -> one row, or None (with the reason recorded) when its data are incomplete."""
    ref_id, ann_id, image_id = int(ref["ref_id"]), ref.get("ann_id"), int(ref["image_id"])
    what = f"ref {ref_id} (image {image_id}, ann {ann_id})"
    image = images.get(image_id)
    if image is None:
        summary.skip("image id not in instances.json", what)
        return None
    ann = anns.get(ann_id)
    if ann is None:
        summary.skip("ann id not in instances.json", what)
        return None
    sentences = [s for s in ref.get("sentences", []) if str(s.get("sent", "")).strip()]
    if not sentences:
        summary.skip("ref without sentences", what)
        return None
    try:
        path = resolve_inside(args.image_dir, image.get("file_name"))
    except ValueError as err:
        summary.skip("image path outside --image-dir", f"{what}: {err}")
        return None
    height, width = int(image["height"]), int(image["width"])
    if image_id not in sizes_checked:
        sizes_checked[image_id] = check_image_file(path, height, width)
    if sizes_checked[image_id] is not None:
        summary.skip(sizes_checked[image_id], f"{what}: {path.name}")
        return None
    try:
        rle = segmentation_to_rle(ann["segmentation"], height, width)
    except (ValueError, KeyError, TypeError) as err:
        summary.skip("bad segmentation", f"{what}: {err}")
        return None
    if rle_area(rle) == 0:  # e.g. a polygon wholly outside the image: nothing to learn or score
        summary.skip("empty mask (segmentation covers no pixel of the image)", what)
        return None
    return {
        "image": image_cell(path, embed=not args.no_embed_images),
        "image_id": image_id,
        "file_name": image["file_name"],
        "height": height,
        "width": width,
        "ref_id": ref_id,
        "ann_id": int(ann_id),
        "category_id": int(ref.get("category_id", ann.get("category_id", -1))),
        "category": categories.get(ref.get("category_id", ann.get("category_id")), ""),
        "sentences": [str(s["sent"]) for s in sentences],
        # Sources without raw text (e.g. re-exported refs) fall back to the tokenised sentence.
        "raw_sentences": [str(s.get("raw", s["sent"])) for s in sentences],
        "sent_ids": [int(s.get("sent_id", -1)) for s in sentences],
        "bbox": [float(v) for v in ann["bbox"]],
        "mask": rle,
    }


def main(argv: list[str] | None = None) -> BuildSummary:
    return run_builder(parse_args, build, argv)


if __name__ == "__main__":
    main()
