"""The dataset builders' input readers on hostile or broken inputs: inflated or deep pickles,
paths leaving the given folders, truncated images, empty masks, and datasets missing columns."""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flmm_hf.datasets_io import UnsafePickleError, load_refs_pickle

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Import a builder script from dataset_scripts/ (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _laughs(depth: int, width: int) -> list:
    """A list holding the same list `width` times, `depth` levels deep: width**depth leaves
    from a pickle of a few hundred bytes (pickle's memo writes each shared list once)."""
    node: list = ["ha"]
    for _ in range(depth):
        node = [node] * width
    return node


def _ref(**extra) -> dict:
    return {"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "category_id": 1,
            "sentences": [{"sent_id": 0, "sent": "the cat", "raw": "The cat"}], **extra}


# --------------------------------------------------------------------------------------
# 1. refs pickle: shared-reference inflation, deep nesting, cycles
# --------------------------------------------------------------------------------------
def test_billion_laughs_pickle_is_refused_quickly_naming_the_file(tmp_path):
    path = tmp_path / "refs(unc).p"
    data = pickle.dumps([_ref(sentences=_laughs(30, 10))], protocol=2)
    assert len(data) < 1000  # 10**30 nodes described in under a kilobyte
    path.write_bytes(data)
    # In a subprocess with a timeout: a reader that expands shared references never returns.
    code = textwrap.dedent(f"""
        import sys, time
        from flmm_hf.datasets_io import UnsafePickleError, load_refs_pickle
        start = time.monotonic()
        try:
            load_refs_pickle({str(path)!r})
        except UnsafePickleError as err:
            print("REFUSED", err)
            print("SECONDS", time.monotonic() - start)
            sys.exit(0)
        sys.exit("accepted")
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                              cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
    except subprocess.TimeoutExpired:
        pytest.fail("reading a 1 kB pickle of shared references did not finish in 30 s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout and str(path) in proc.stdout and "billion laughs" in proc.stdout
    assert float(proc.stdout.split("SECONDS")[1]) < 2


def test_shared_references_are_converted_once_and_stay_shared(tmp_path):
    shared = {b"sent": b"the cat", "tokens": [b"the", b"cat"]}
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([_ref(sentences=[shared] * 3, deep=_laughs(12, 2))], protocol=4))
    (ref,) = load_refs_pickle(path)
    assert ref["sentences"][0] == {"sent": "the cat", "tokens": ["the", "cat"]}
    assert ref["sentences"][0] is ref["sentences"][1] is ref["sentences"][2]
    assert ref["deep"][0] is ref["deep"][1]
    # the cap counts the expanded tree: 2**13 - 1 lists + 2**12 leaves here
    with pytest.raises(UnsafePickleError, match="refs.p.*expands to more than 1,000 nodes"):
        load_refs_pickle(path, max_nodes=1000)


def _deep_list_pickle(depth: int) -> bytes:
    """[{'sentences': [[[...]]]}] nested `depth` lists deep, written opcode by opcode
    (pickle.dumps itself recurses and cannot write it)."""
    return (b"\x80\x02]}U\x09sentences" + b"]" * depth + b"a" * (depth - 1) + b"sa.")


def test_deeply_nested_pickle_does_not_hit_the_recursion_limit(tmp_path):
    depth = 5 * sys.getrecursionlimit()
    path = tmp_path / "refs.p"
    path.write_bytes(_deep_list_pickle(depth))
    (ref,) = load_refs_pickle(path)
    node, levels = ref["sentences"], 1
    while node:
        node, levels = node[0], levels + 1
    assert levels == depth


def test_self_containing_pickle_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([_ref(sentences=loop)], protocol=2))
    with pytest.raises(UnsafePickleError, match="contains itself"):
        load_refs_pickle(path)


# --------------------------------------------------------------------------------------
# RefCOCO inputs written here around real fixture images
# --------------------------------------------------------------------------------------
GOOD_IMAGE = "COCO_train2014_000000157714.jpg"  # 640 x 480


def _refcoco_inputs(src: Path, images: list[dict]) -> tuple[Path, Path]:
    """instances.json + refs pickle with one ref per image: its "segmentation" (taken out of the
    image record) or a box polygon."""
    annotations, refs = [], []
    for k, image in enumerate(images):
        w, h = image["width"], image["height"]
        seg = image.pop("segmentation", None) or [[10, 10, w / 2, 10, w / 2, h / 2, 10, h / 2]]
        annotations.append({"id": 100 + k, "image_id": image["id"], "category_id": 1,
                            "bbox": [10, 10, w / 2 - 10, h / 2 - 10], "segmentation": seg, "iscrowd": 0})
        refs.append({"ref_id": k, "ann_id": 100 + k, "image_id": image["id"], "split": "val", "category_id": 1,
                     "sentences": [{"sent_id": k, "sent": f"thing {k}", "raw": f"Thing {k}"}]})
    src.mkdir(parents=True, exist_ok=True)
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (src / "instances.json").write_text(json.dumps(instances))
    (src / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return src / "instances.json", src / "refs(unc).p"


def _run_refcoco(inputs: tuple[Path, Path], image_dir: Path, out: Path):
    instances, refs = inputs
    return _script("build_refcoco").main(["--dataset", "refcoco", "--instances", str(instances), "--refs", str(refs),
                                          "--image-dir", str(image_dir), "--output-dir", str(out)])


def _written(out: Path, column: str) -> list:
    import pyarrow.parquet as pq

    return [v for shard in sorted((out / "data").glob("*.parquet")) for v in pq.read_table(shard).column(column).to_pylist()]


@pytest.fixture
def image_dir(fixtures_dir, tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / GOOD_IMAGE).write_bytes((fixtures_dir / "coco" / "images" / GOOD_IMAGE).read_bytes())
    return folder


# --------------------------------------------------------------------------------------
# 2. file names that leave --image-dir / --panoptic-dir
# --------------------------------------------------------------------------------------
def test_refcoco_refuses_image_paths_outside_the_image_dir(fixtures_dir, tmp_path, image_dir):
    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes((fixtures_dir / "coco" / "images" / "COCO_train2014_000000363252.jpg").read_bytes())
    (image_dir / "link.jpg").symlink_to(secret)  # inside by name, outside in fact
    size = {"height": 500, "width": 375}
    images = [{"id": 1, "file_name": GOOD_IMAGE, "height": 480, "width": 640},
              {"id": 2, "file_name": "../private/secret.jpg", **size},
              {"id": 3, "file_name": str(secret), **size},
              {"id": 4, "file_name": "link.jpg", **size},
              {"id": 5, "file_name": "sub/../../private/secret.jpg", **size}]
    out = tmp_path / "out"
    summary = _run_refcoco(_refcoco_inputs(tmp_path / "src", images), image_dir, out)
    assert summary.skipped == {"image path outside --image-dir": 4}
    assert _written(out, "image_id") == [1]
    secret_bytes = secret.read_bytes()
    assert all(cell["bytes"] != secret_bytes for cell in _written(out, "image"))


def test_png_refuses_image_and_panoptic_paths_outside_their_folders(fixtures_dir, tmp_path):
    good = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())[0]
    pan = json.loads((fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json").read_text())
    outside = tmp_path / "outside.png"
    outside.write_bytes((fixtures_dir / "coco" / "images" / "000000039769.png").read_bytes())
    for image in pan["images"]:
        if image["id"] == 39769:
            image["file_name"] = str(outside)  # absolute: Path / absolute drops the folder
    for ann in pan["annotations"]:
        if ann["image_id"] == 142238:
            ann["file_name"] = "../outside_pan.png"
    panoptic_dir = tmp_path / "panoptic"
    panoptic_dir.mkdir()
    for name in ("000000039769.png", "000000142238.png"):
        (panoptic_dir / name).write_bytes((fixtures_dir / "coco" / "panoptic" / name).read_bytes())
    (tmp_path / "outside_pan.png").write_bytes((fixtures_dir / "coco" / "panoptic" / "000000142238.png").read_bytes())
    (tmp_path / "pan.json").write_text(json.dumps(pan))
    other = dict(good, narrative_id="other", image_id="142238")
    (tmp_path / "png.json").write_text(json.dumps([good, other]))
    summary = _script("build_png").main([
        "--png-json", str(tmp_path / "png.json"), "--panoptic-json", str(tmp_path / "pan.json"),
        "--panoptic-dir", str(panoptic_dir), "--image-dir", str(fixtures_dir / "coco" / "images"),
        "--output-dir", str(tmp_path / "out"), "--split", "val"])
    assert summary.skipped == {"image path outside --image-dir": 1, "panoptic png path outside --panoptic-dir": 1}
    assert summary.written["val"] == 0


# --------------------------------------------------------------------------------------
# 3. truncated images
# --------------------------------------------------------------------------------------
def _truncate(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # the header is intact; half of the scan is gone


def test_refcoco_skips_a_truncated_jpeg_with_a_valid_header(fixtures_dir, tmp_path, image_dir):
    from PIL import Image

    _truncate(fixtures_dir / "coco" / "images" / "COCO_train2014_000000363252.jpg", image_dir / "cut.jpg")
    assert Image.open(image_dir / "cut.jpg").size == (375, 500)  # the header still reads
    images = [{"id": 1, "file_name": GOOD_IMAGE, "height": 480, "width": 640},
              {"id": 2, "file_name": "cut.jpg", "height": 500, "width": 375}]
    out = tmp_path / "out"
    summary = _run_refcoco(_refcoco_inputs(tmp_path / "src", images), image_dir, out)
    assert summary.skipped == {"image file unreadable (truncated or corrupt)": 1}
    assert _written(out, "image_id") == [1]


def test_png_skips_truncated_images_and_panoptic_pngs(fixtures_dir, tmp_path):
    good = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())[0]
    images = tmp_path / "images"
    images.mkdir()
    _truncate(fixtures_dir / "coco" / "images" / "000000039769.png", images / "000000039769.png")
    panoptic = tmp_path / "panoptic"
    panoptic.mkdir()
    (panoptic / "000000039769.png").write_bytes((fixtures_dir / "coco" / "panoptic" / "000000039769.png").read_bytes())
    _truncate(fixtures_dir / "coco" / "panoptic" / "000000142238.png", panoptic / "000000142238.png")
    other = dict(good, narrative_id="other", image_id="142238")
    (tmp_path / "png.json").write_text(json.dumps([good, other]))
    summary = _script("build_png").main([
        "--png-json", str(tmp_path / "png.json"),
        "--panoptic-json", str(fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json"),
        "--panoptic-dir", str(panoptic), "--image-dir", str(images),
        "--output-dir", str(tmp_path / "out"), "--split", "val"])
    assert summary.skipped == {"image file unreadable (truncated or corrupt)": 1,
                               "panoptic png unreadable (truncated or corrupt)": 1}
    assert summary.written["val"] == 0


# --------------------------------------------------------------------------------------
# 4. empty masks
# --------------------------------------------------------------------------------------
def test_refcoco_skips_refs_whose_mask_is_empty(tmp_path, image_dir):
    good = {"id": 1, "file_name": GOOD_IMAGE, "height": 480, "width": 640}
    outside = [[700, 500, 800, 500, 800, 600, 700, 600]]  # wholly beyond the 640 x 480 image
    negative = [[-90, -90, -10, -90, -10, -10, -90, -10]]
    rle_zeros = {"size": [480, 640], "counts": [480 * 640]}  # uncompressed RLE, all background
    images = [good] + [dict(good, id=2 + k, segmentation=seg) for k, seg in enumerate([outside, negative, rle_zeros])]
    out = tmp_path / "out"
    summary = _run_refcoco(_refcoco_inputs(tmp_path / "src", images), image_dir, out)
    assert summary.skipped == {"empty mask (segmentation covers no pixel of the image)": 3}
    assert _written(out, "image_id") == [1]


# --------------------------------------------------------------------------------------
# 5. datasets missing the columns of their row kind
# --------------------------------------------------------------------------------------
def _refcoco_rows(drop: tuple[str, ...] = ()) -> dict[str, list]:
    import io

    from PIL import Image

    from flmm_hf.datasets_io import mask_to_rle

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(buf, format="PNG")
    import numpy as np

    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:5] = True
    row = {"image": {"bytes": buf.getvalue(), "path": None}, "image_id": 7, "file_name": "x.png", "height": 6,
           "width": 8, "ref_id": 1, "ann_id": 2, "category_id": 1, "category": "thing", "sentences": ["red thing"],
           "raw_sentences": ["Red thing"], "sent_ids": [0], "bbox": [2.0, 1.0, 3.0, 3.0], "mask": mask_to_rle(mask)}
    return {k: [v] for k, v in row.items() if k not in drop}


def _parquet_folder(folder: Path, rows: dict[str, list]) -> Path:
    from datasets import Dataset, Image

    ds = Dataset.from_dict(rows)
    if "image" in rows:
        ds = ds.cast_column("image", Image())
    (folder / "data").mkdir(parents=True)
    ds.to_parquet(str(folder / "data" / "train-00000.parquet"))
    return folder


def test_load_split_names_the_missing_columns_and_the_builder(tmp_path):
    from flmm_hf.training import load_split

    folder = _parquet_folder(tmp_path / "no_mask", _refcoco_rows(drop=("mask",)))
    with pytest.raises(ValueError, match=r"RefCOCO rows need the column\(s\) 'mask'.*build_refcoco\.py"):
        load_split(str(folder), "train", concat_refs=False)
    folder = _parquet_folder(tmp_path / "no_category", _refcoco_rows(drop=("category",)))
    with pytest.raises(ValueError, match=r"group_refs_by_image.*\['category'\].*build_refcoco\.py"):
        load_split(str(folder), "train", concat_refs=True)  # was a DatasetGenerationError
    folder = _parquet_folder(tmp_path / "unknown", {"image_id": [1], "text": ["a"]})
    with pytest.raises(ValueError, match=r"unknown row layout.*build_png\.py.*build_refcoco\.py"):
        load_split(str(folder), "train", concat_refs=False)


def test_transform_names_missing_columns_null_images_and_segment_fields():
    from flmm_hf.data import FLMMTransform

    transform = FLMMTransform(train=False)
    row = {k: v[0] for k, v in _refcoco_rows().items()}
    assert transform.example(row)["text"] == "red thing."
    with pytest.raises(ValueError, match=r"'raw_sentences' or 'sentences'.*build_refcoco\.py"):
        transform.example({k: v for k, v in row.items() if k not in ("sentences", "raw_sentences")})
    with pytest.raises(ValueError, match=r"image_id 7 has no image.*build_refcoco\.py"):  # was 'NoneType' ... 'convert'
        transform.example(dict(row, image=None))
    with pytest.raises(ValueError, match=r"image_id 7 has no image"):
        transform.example(dict(row, image={"bytes": None, "path": None}))
    png = {"image": row["image"], "image_id": 7, "caption": "a red thing",
           "segments": [{"utterance": "a red thing", "start": 0, "end": 11, "segment_ids": [1]}]}
    with pytest.raises(ValueError, match=r"PNG segments need the fields \['plural', 'isthing', 'mask'\].*build_png\.py"):
        transform.example(png)
    with pytest.raises(ValueError, match=r"PNG rows need the column\(s\) 'segments'.*build_png\.py"):
        transform.example({k: v for k, v in png.items() if k != "segments"})
