"""Dataset builders (RefCOCO, PNG, shapes) on the real fixture files: round trips, safety, skips."""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import load_dataset
from PIL import Image
from pycocotools.coco import COCO

from flmm_hf.datasets_io import (
    UnsafePickleError,
    load_refs_pickle,
    mask_to_rle,
    rle_to_mask,
    safe_pickle_loads,
)

REPO = Path(__file__).resolve().parents[1]
REFCOCO_IMAGES = {157714: "COCO_train2014_000000157714.jpg", 363252: "COCO_train2014_000000363252.jpg",
                  460370: "COCO_train2014_000000460370.jpg"}


def _script(name: str):
    """Import a builder script from dataset_scripts/ (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# RefCOCO input files made from the real annotations in the fixtures
# --------------------------------------------------------------------------------------
def make_refcoco_inputs(fixtures_dir: Path, out: Path) -> tuple[Path, Path, list[dict]]:
    """instances.json + refs pickle: real sentences/boxes of 3 RefCOCO val images (their masks
    are the boxes as polygons: no polygons exist for them) and the real polygons of image 39769
    (train split, with sentences written here from the category names)."""
    images_dir = fixtures_dir / "coco" / "images"
    refs_json = json.loads((fixtures_dir / "refcoco" / "refcoco_unc_val_3images.json").read_text())
    inst39769 = json.loads((fixtures_dir / "coco" / "instances" / "instances_val2017_000000039769.json").read_text())
    cat_names = {c["id"]: c["name"] for c in inst39769["categories"]}
    images, annotations, refs = [], [], []
    for image_id, file_name in REFCOCO_IMAGES.items():
        w, h = Image.open(images_dir / file_name).size
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    for ref in refs_json:
        x, y, w, h = ref["bbox"]
        ann_id = 5_000_000 + ref["ref_id"]
        annotations.append({"id": ann_id, "image_id": ref["image_id"], "category_id": 1, "bbox": ref["bbox"],
                            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "iscrowd": 0})
        refs.append({"ref_id": ref["ref_id"], "ann_id": ann_id, "image_id": ref["image_id"], "split": "val",
                     "category_id": 1, "sent_ids": [s["sent_id"] for s in ref["sentences"]],
                     "sentences": [{"sent_id": s["sent_id"], "sent": s["sent"], "raw": s["sent"],
                                    "tokens": s["sent"].split()} for s in ref["sentences"]]})
    images += inst39769["images"]
    for k, ann in enumerate(inst39769["annotations"]):
        annotations.append(ann)
        name = cat_names[ann["category_id"]]
        refs.append({"ref_id": 90_000 + k, "ann_id": ann["id"], "image_id": ann["image_id"], "split": "train",
                     "category_id": ann["category_id"], "sent_ids": [k * 2, k * 2 + 1],
                     "sentences": [{"sent_id": k * 2, "sent": f"the {name} number {k}", "raw": f"The {name} #{k}"},
                                   {"sent_id": k * 2 + 1, "sent": f"{name} {k}", "raw": f"{name} {k}"}]})
    instances = {"images": images, "annotations": annotations, "categories": inst39769["categories"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "instances.json").write_text(json.dumps(instances))
    # protocol 2, plain containers: what the original Python 2 refs files hold
    (out / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return out / "instances.json", out / "refs(unc).p", refs


def run_refcoco(fixtures_dir, inputs, out, *extra, image_dir=None):
    instances, refs_path, _ = inputs
    argv = ["--dataset", "refcoco", "--instances", str(instances), "--refs", str(refs_path),
            "--image-dir", str(image_dir or fixtures_dir / "coco" / "images"), "--output-dir", str(out), *extra]
    return _script("build_refcoco").main(argv)


@pytest.fixture
def refcoco_inputs(fixtures_dir, tmp_path):
    return make_refcoco_inputs(fixtures_dir, tmp_path / "src")


def test_refcoco_roundtrip(fixtures_dir, tmp_path, refcoco_inputs):
    instances_path, _, refs = refcoco_inputs
    out = tmp_path / "refcoco"
    summary = run_refcoco(fixtures_dir, refcoco_inputs, out)
    assert not summary.skipped
    ds = load_dataset(str(out))
    assert set(ds) == {"train", "val"}
    assert ds["val"].num_rows == 7 and ds["train"].num_rows == 6
    coco = COCO(str(instances_path))  # pycocotools' own rasterisation is the reference
    by_ref = {r["ref_id"]: r for r in refs}
    seen = 0
    for split in ds:
        for row in ds[split]:
            ref = by_ref[row["ref_id"]]
            ann = coco.anns[ref["ann_id"]]
            assert row["sentences"] == [s["sent"] for s in ref["sentences"]]
            assert row["raw_sentences"] == [s["raw"] for s in ref["sentences"]]
            assert row["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            assert row["bbox"] == pytest.approx(ann["bbox"])
            assert (row["image_id"], row["ann_id"], row["category_id"]) == (ref["image_id"], ref["ann_id"], ref["category_id"])
            mask = rle_to_mask(row["mask"])
            expected = coco.annToMask(ann).astype(bool)
            assert mask.shape == expected.shape and np.array_equal(mask, expected)
            assert mask.sum() > 100  # a real object, not an empty mask
            assert row["image"].size == (row["width"], row["height"]) == (coco.imgs[row["image_id"]]["width"],
                                                                          coco.imgs[row["image_id"]]["height"])
            seen += 1
    assert seen == 13
    # the 39769 cats: a polygon mask that is not its box (the polygon, not the bbox, was used)
    cat_row = next(r for r in ds["train"] if r["category"] == "cat")
    x, y, w, h = cat_row["bbox"]
    assert rle_to_mask(cat_row["mask"]).sum() < 0.95 * w * h
    assert ds["val"][0]["sentences"] == ["extreme left person with red bag", "person on left who is cut off",
                                         "left edge woman"]


def test_refcoco_card_summary_and_paths(fixtures_dir, tmp_path, refcoco_inputs):
    out = tmp_path / "refcoco"
    run_refcoco(fixtures_dir, refcoco_inputs, out, "--no-embed-images", "--split", "val")
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["configs"][0]["data_files"] == [{"split": "val", "path": "data/val-*"}]
    assert meta["license"] and "kazemzadeh2014referitgame" in text
    assert {f["name"] for f in meta["dataset_info"]["features"]} >= {"image", "sentences", "bbox", "mask"}
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 7
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["written"] == {"val": 7}
    ds = load_dataset(str(out), split="val")
    # images are referenced by path, yet decode
    assert ds.cast_column("image", ds.features["image"].__class__(decode=False))[0]["image"]["bytes"] is None
    assert ds[0]["image"].size == (ds[0]["width"], ds[0]["height"])


def test_refcoco_resume_idempotent_and_shards(fixtures_dir, tmp_path, refcoco_inputs):
    out = tmp_path / "refcoco"
    run_refcoco(fixtures_dir, refcoco_inputs, out, "--max-samples", "3", "--max-rows-per-shard", "2")
    assert load_dataset(str(out))["val"].num_rows == 3
    summary = run_refcoco(fixtures_dir, refcoco_inputs, out, "--max-rows-per-shard", "2")
    assert summary.already_present["val"] == 3 and summary.written["val"] == 4
    run_refcoco(fixtures_dir, refcoco_inputs, out, "--max-rows-per-shard", "2")  # nothing new
    ds = load_dataset(str(out))
    assert sorted(ds["val"]["ref_id"]) == sorted(r["ref_id"] for r in refcoco_inputs[2] if r["split"] == "val")
    assert ds["train"].num_rows == 6
    shards = sorted((out / "data").glob("val-*.parquet"))
    assert len(shards) >= 3  # bounded shards: 2 rows each at most
    import pyarrow.parquet as pq

    assert max(pq.ParquetFile(s).metadata.num_rows for s in shards) <= 2


class _Evil:
    def __reduce__(self):  # executing this would create a file
        return (open, (str(Path(__file__).parent / "_pwned_marker"), "w"))


class _Plain:
    pass


@pytest.mark.parametrize("payload", [_Evil(), _Plain()], ids=["reduce", "instance"])
def test_refs_pickle_refuses_objects(tmp_path, payload, fixtures_dir, refcoco_inputs):
    marker = Path(__file__).parent / "_pwned_marker"
    data = pickle.dumps([{"ref_id": 1, "sentences": [], "x": payload}], protocol=2)
    with pytest.raises(UnsafePickleError, match="refusing"):
        safe_pickle_loads(data)
    assert not marker.exists()
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(data)
    with pytest.raises(UnsafePickleError):
        load_refs_pickle(bad)
    with pytest.raises(UnsafePickleError):
        run_refcoco(fixtures_dir, (refcoco_inputs[0], bad, None), tmp_path / "out")
    assert not marker.exists()
    # the same structure without the object loads fine (sets are plain containers too)
    assert safe_pickle_loads(pickle.dumps([{"a": (1, 2.0, "s", None, {3})}], protocol=2)) == [{"a": (1, 2.0, "s", None, {3})}]


def test_refcoco_missing_images_are_reported(fixtures_dir, tmp_path, refcoco_inputs):
    image_dir = tmp_path / "images"
    shutil.copytree(fixtures_dir / "coco" / "images", image_dir)
    (image_dir / REFCOCO_IMAGES[460370]).unlink()
    out = tmp_path / "refcoco"
    summary = run_refcoco(fixtures_dir, refcoco_inputs, out, image_dir=image_dir)
    assert summary.skipped["image file missing"] == 3  # the three refs of 460370
    assert summary.written["val"] == 4 and summary.written["train"] == 6
    saved = json.loads((out / "build_summary.json").read_text())
    assert saved["skipped"] == {"image file missing": 3}
    assert "image file missing" in (out / "README.md").read_text()
    assert 460370 not in load_dataset(str(out), split="val")["image_id"]


# --------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------
def run_png(fixtures_dir, out, png_json=None, image_dir=None, *extra):
    argv = ["--png-json", str(png_json or fixtures_dir / "png" / "png_format_sample_constructed.json"),
            "--panoptic-json", str(fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json"),
            "--panoptic-dir", str(fixtures_dir / "coco" / "panoptic"),
            "--image-dir", str(image_dir or fixtures_dir / "coco" / "images"),
            "--output-dir", str(out), "--split", "val", *extra]
    return _script("build_png").main(argv)


def test_png_roundtrip(fixtures_dir, tmp_path):
    record = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())[0]
    out = tmp_path / "png"
    summary = run_png(fixtures_dir, out)
    assert not summary.skipped
    ds = load_dataset(str(out), split="val")
    assert ds.num_rows == 1
    row = ds[0]
    assert row["caption"] == record["caption"] and row["image"].size == (640, 480)
    # independent reading of the panoptic PNG: id = R + 256 G + 256^2 B
    rgb = np.asarray(Image.open(fixtures_dir / "coco" / "panoptic" / "000000039769.png").convert("RGB")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    assert len(row["segments"]) == len(record["segments"])
    for seg, src in zip(row["segments"], record["segments"]):
        assert row["caption"][seg["start"]:seg["end"]] == src["utterance"] == seg["utterance"]
        assert seg["segment_ids"] == [int(s) for s in src["segment_ids"]]
        assert seg["plural"] == src["plural"]
        if src["segment_ids"]:
            expected = np.isin(ids, [int(s) for s in src["segment_ids"]])
            assert expected.sum() > 0 and np.array_equal(rle_to_mask(seg["mask"]), expected)
        else:
            assert seg["mask"] is None and seg["isthing"] is False
    by_utt = {s["utterance"].strip(): s for s in row["segments"]}
    assert rle_to_mask(by_utt["two cats"]["mask"]).sum() == (ids == 8222595).sum() + (ids == 8225432).sum()
    # cats (plural) and couch/remote are things, the blanket (category 93) is stuff
    assert [by_utt[u]["isthing"] for u in ("two cats", "a pink couch", "a remote", "a blanket")] == [True, True, True, False]
    assert by_utt["two cats"]["plural"] and not by_utt["a remote"]["plural"]


def test_png_bad_records_are_reported(fixtures_dir, tmp_path):
    good = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())[0]
    absent = json.loads(json.dumps(good))
    absent["narrative_id"] = "absent-id"
    absent["segments"][1]["segment_ids"] = ["8222595", "4242"]  # 4242 is not in the PNG
    empty = {"image_id": "39769", "narrative_id": "empty", "caption": "", "segments": []}
    other = json.loads(json.dumps(good))
    other["narrative_id"] = "other-image"
    other["image_id"] = "142238"  # its image file is removed below
    records = [absent, empty, good, other]
    png_json = tmp_path / "png_coco_val2017.json"
    png_json.write_text(json.dumps(records))
    image_dir = tmp_path / "images"
    shutil.copytree(fixtures_dir / "coco" / "images", image_dir)
    (image_dir / "000000142238.jpg").unlink()
    out = tmp_path / "png"
    summary = run_png(fixtures_dir, out, png_json, image_dir)
    assert summary.written["val"] == 1
    assert summary.skipped["segment id not in panoptic annotation"] == 1
    assert summary.skipped["empty narrative"] == 1
    assert summary.skipped["image file missing"] == 1
    assert load_dataset(str(out), split="val")["narrative_id"] == ["constructed-0001"]
    assert "empty narrative" in (out / "README.md").read_text()


def test_png_id_in_json_but_absent_from_png(fixtures_dir, tmp_path):
    """An id listed in segments_info but not painted in the PNG is caught too."""
    pan = json.loads((fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json").read_text())
    ann = next(a for a in pan["annotations"] if a["image_id"] == 39769)
    ann["segments_info"].append({"id": 777, "category_id": 17, "iscrowd": 0})
    pan_json = tmp_path / "panoptic.json"
    pan_json.write_text(json.dumps(pan))
    record = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())
    record[0]["segments"][3]["segment_ids"] = ["777"]
    png_json = tmp_path / "png.json"
    png_json.write_text(json.dumps(record))
    mod = _script("build_png")
    summary = mod.main(["--png-json", str(png_json), "--panoptic-json", str(pan_json),
                        "--panoptic-dir", str(fixtures_dir / "coco" / "panoptic"),
                        "--image-dir", str(fixtures_dir / "coco" / "images"),
                        "--output-dir", str(tmp_path / "out"), "--split", "val"])
    assert summary.skipped == {"segment id absent from panoptic png": 1}
    assert summary.written["val"] == 0


# --------------------------------------------------------------------------------------
# Shapes and RLE helpers
# --------------------------------------------------------------------------------------
def test_shapes_builder_reproducible_same_schema(tmp_path):
    mod = _script("build_shapes")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        mod.main(["--output-dir", str(out), "--train-scenes", "6", "--val-scenes", "2", "--test-scenes", "2",
                  "--image-size", "64", "--seed", "3"])
    da, db = load_dataset(str(a)), load_dataset(str(b))
    from flmm_hf.datasets_io import refcoco_features

    assert da["train"].features == refcoco_features()
    assert da["train"].remove_columns("image").to_list() == db["train"].remove_columns("image").to_list()
    assert da["train"][0]["image"].tobytes() == db["train"][0]["image"].tobytes()
    row = da["train"][0]
    mask = rle_to_mask(row["mask"])
    assert mask.shape == (64, 64) and mask.sum() > 10
    assert row["sentences"][0] == f"the {row['sentences'][0].split()[1]} {row['category']}"
    # the mask is where the object's colour is
    pixels = np.asarray(row["image"])[mask]
    assert (np.abs(pixels.astype(int) - pixels.mean(0)).max() < 30)
    assert not set(da["train"]["image_id"]) & set(da["val"]["image_id"])
    other = tmp_path / "c"
    mod.main(["--output-dir", str(other), "--train-scenes", "6", "--image-size", "64", "--seed", "4", "--split", "train"])
    assert load_dataset(str(other), split="train")["bbox"] != da["train"]["bbox"]


def test_rle_helpers_roundtrip():
    rng = np.random.default_rng(0)
    mask = rng.random((17, 23)) > 0.5
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [17, 23]
    assert np.array_equal(rle_to_mask(rle), mask)
