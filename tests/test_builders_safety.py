"""What the dataset builders may touch in --output-dir: nothing of the user's, nothing stale.

The builders write into a folder the user names; inputs may sit inside it, a README.md may be
the user's own, and a rerun may use other inputs or arguments. These tests build tiny sets from
the real fixtures and check that nothing is lost and no stale rows are kept silently.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from datasets import load_dataset

from test_datasets import _script, make_refcoco_inputs, refcoco_inputs, run_png, run_refcoco  # noqa: F401 (fixture)


def _shapes(out: Path, *extra: str):
    return _script("build_shapes").main(
        ["--output-dir", str(out), "--train-scenes", "2", "--val-scenes", "1", "--test-scenes", "1",
         "--image-size", "32", *extra]
    )


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what must survive untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------
# 1. inputs inside --output-dir; --overwrite deletes only what a build wrote
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("inside", ["instances", "refs", "image-dir"])
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "resume"])
def test_refcoco_refuses_inputs_inside_output_dir(fixtures_dir, tmp_path, inside, overwrite):
    out = tmp_path / "out"
    src = make_refcoco_inputs(fixtures_dir, out / "annotations" if inside != "image-dir" else tmp_path / "src")
    instances, refs_path, refs = src
    image_dir = fixtures_dir / "coco" / "images"
    if inside == "image-dir":
        image_dir = out / "train2014"
        shutil.copytree(fixtures_dir / "coco" / "images", image_dir)
    elif inside == "refs":  # only the refs inside: move the instances out again
        outside = tmp_path / "outside_instances.json"
        shutil.move(str(instances), outside)
        src = (outside, refs_path, refs)
    before = _tree(out)
    with pytest.raises(ValueError, match=rf"--{inside} .* inside --output-dir") as err:
        run_refcoco(fixtures_dir, src, out, *(["--overwrite"] if overwrite else []), image_dir=image_dir)
    assert "outside" in str(err.value)  # the fix is named
    assert _tree(out) == before  # refused before touching anything


def test_png_refuses_inputs_inside_output_dir(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    png_json = out / "png_coco_val2017.json"
    png_json.parent.mkdir()
    shutil.copy(fixtures_dir / "png" / "png_format_sample_constructed.json", png_json)
    with pytest.raises(ValueError, match="--png-json .* inside --output-dir"):
        run_png(fixtures_dir, out, png_json, None, "--overwrite")
    assert png_json.is_file()
    # the output folder being an input folder counts as inside too (a copy: never risk the fixtures)
    panoptic_dir = tmp_path / "panoptic"
    shutil.copytree(fixtures_dir / "coco" / "panoptic", panoptic_dir)
    before = _tree(panoptic_dir)
    with pytest.raises(ValueError, match="--panoptic-dir .* inside --output-dir"):
        _script("build_png").main([
            "--png-json", str(fixtures_dir / "png" / "png_format_sample_constructed.json"),
            "--panoptic-json", str(fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json"),
            "--panoptic-dir", str(panoptic_dir), "--image-dir", str(fixtures_dir / "coco" / "images"),
            "--output-dir", str(panoptic_dir), "--split", "val", "--overwrite"])
    assert _tree(panoptic_dir) == before


def test_overwrite_deletes_only_files_the_build_wrote(fixtures_dir, tmp_path, refcoco_inputs):
    out = tmp_path / "refcoco"
    run_refcoco(fixtures_dir, refcoco_inputs, out, "--max-rows-per-shard", "2")
    assert len(list((out / "data").glob("*.parquet"))) == 7  # 4 val + 3 train shards
    (out / "notes.txt").write_text("mine")
    (out / "keep").mkdir()
    (out / "keep" / "instances.json").write_text("{}")
    summary = run_refcoco(fixtures_dir, refcoco_inputs, out, "--overwrite", "--split", "val", "--max-samples", "2")
    assert summary.written == {"val": 2} and not summary.already_present["val"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "keep" / "instances.json").read_text() == "{}"
    # the earlier build's shards are all gone (no stale train split), the new one is complete
    assert sorted(p.name for p in (out / "data").iterdir()) == ["val-00000.parquet"]
    assert list(load_dataset(str(out)).keys()) == ["val"]
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert set(manifest["files"]) == {"data/val-00000.parquet", "README.md", "build_summary.json"}


def test_overwrite_ignores_manifest_entries_outside_the_folder(fixtures_dir, tmp_path):
    out = tmp_path / "shapes"
    _shapes(out)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the builder's")
    manifest_path = out / "build_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../victim.txt"] = {}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"\.\./victim\.txt.*outside"):
        _shapes(out, "--overwrite")
    assert victim.read_text() == "not the builder's"


# --------------------------------------------------------------------------------------
# 2. a README.md (or any file) the builder did not write is never replaced
# --------------------------------------------------------------------------------------
def _build(kind: str, fixtures_dir: Path, tmp_path: Path, out: Path, *extra: str):
    if kind == "shapes":
        return _shapes(out, *extra)
    if kind == "png":
        return run_png(fixtures_dir, out, None, None, *extra)
    return run_refcoco(fixtures_dir, make_refcoco_inputs(fixtures_dir, tmp_path / "src"), out, *extra)


@pytest.mark.parametrize("kind", ["shapes", "refcoco", "png"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
def test_builders_never_replace_a_readme_they_did_not_write(fixtures_dir, tmp_path, kind, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my own notes\n")
    before = _tree(out)
    with pytest.raises(ValueError, match="README.md") as err:
        _build(kind, fixtures_dir, tmp_path, out, *(["--overwrite"] if overwrite else []))
    assert "not written by" in str(err.value) and "another --output-dir" in str(err.value)
    assert _tree(out) == before  # refused before writing anything


@pytest.mark.parametrize("edited", ["README.md", "build_summary.json"])
def test_an_edited_card_is_no_longer_the_builders(tmp_path, edited):
    out = tmp_path / "shapes"
    _shapes(out)
    (out / edited).write_text((out / edited).read_text() + "\nmy edits\n")
    before = _tree(out)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match=f"{edited} was edited after the build wrote it"):
            _shapes(out, *extra)
        assert _tree(out) == before


def test_a_strangers_file_in_data_is_refused(tmp_path):
    out = tmp_path / "shapes"
    _shapes(out)
    (out / "data" / "train-99999.parquet").write_bytes(b"someone else's")
    before = _tree(out)
    with pytest.raises(ValueError, match=r"train-99999\.parquet was not written by a build"):
        _shapes(out, "--overwrite")
    assert _tree(out) == before


def test_library_card_and_summary_never_replace_existing_files(tmp_path):
    from flmm_hf.datasets_io import BuildSummary, refcoco_features, write_dataset_card

    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "build_summary.json").write_text("mine")
    with pytest.raises(ValueError, match="README.md exists"):
        write_dataset_card(tmp_path, pretty_name="x", features=refcoco_features(), description="d",
                           license="mit", citation="c", build_command="b")
    with pytest.raises(ValueError, match="build_summary.json exists"):
        BuildSummary().save(tmp_path)
    assert (tmp_path / "README.md").read_text() == (tmp_path / "build_summary.json").read_text() == "mine"


# --------------------------------------------------------------------------------------
# 3. a resume from other inputs or arguments is refused (no stale rows)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [("--seed", "3", "4"), ("--image-size", "32", "40")], ids=["seed", "image-size"])
def test_shapes_resume_with_other_arguments_is_refused(tmp_path, change):
    flag, old, new = change
    out = tmp_path / "shapes"
    _shapes(out, "--seed", "3", flag, old)
    before = _tree(out)
    with pytest.raises(ValueError, match=rf"{flag}: {old} -> {new}.*--overwrite"):
        _shapes(out, "--seed", "3", flag, new)
    assert _tree(out) == before
    summary = _shapes(out, "--seed", "3", flag, new, "--overwrite")
    assert summary.written["train"] > 0 and not summary.already_present["train"]
    assert _shapes(out, "--seed", "3", flag, new).written["train"] == 0  # same arguments resume


def test_refcoco_resume_with_changed_sentences_is_refused(fixtures_dir, tmp_path):
    instances, refs_path, refs = make_refcoco_inputs(fixtures_dir, tmp_path / "src")
    out = tmp_path / "refcoco"
    run_refcoco(fixtures_dir, (instances, refs_path, refs), out, "--split", "val", "--max-samples", "3")
    # resuming with more samples, other shards or another split is fine: those do not change rows
    assert run_refcoco(fixtures_dir, (instances, refs_path, refs), out, "--max-rows-per-shard", "2").written["val"] == 4
    refs[0]["sentences"][0]["sent"] = "a corrected sentence"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"--refs sha256: .* -> .*--overwrite"):
        run_refcoco(fixtures_dir, (instances, refs_path, refs), out)
    with pytest.raises(ValueError, match=r"--no-embed-images: false -> true"):
        run_refcoco(fixtures_dir, (instances, refs_path, refs), out, "--no-embed-images")
    run_refcoco(fixtures_dir, (instances, refs_path, refs), out, "--overwrite")
    row = next(r for r in load_dataset(str(out), split="val") if r["ref_id"] == refs[0]["ref_id"])
    assert row["sentences"][0] == "a corrected sentence"


def test_refcoco_resume_with_a_replaced_image_is_refused(fixtures_dir, tmp_path, refcoco_inputs):
    image_dir = tmp_path / "images"
    shutil.copytree(fixtures_dir / "coco" / "images", image_dir)
    out = tmp_path / "refcoco"
    run_refcoco(fixtures_dir, refcoco_inputs, out, image_dir=image_dir)
    (image_dir / "COCO_train2014_000000157714.jpg").write_bytes(b"not the same image")
    with pytest.raises(ValueError, match="--image-dir files"):
        run_refcoco(fixtures_dir, refcoco_inputs, out, image_dir=image_dir)


def test_png_resume_with_changed_narratives_is_refused(fixtures_dir, tmp_path):
    records = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())
    png_json = tmp_path / "png_coco_val2017.json"
    png_json.write_text(json.dumps(records))
    out = tmp_path / "png"
    run_png(fixtures_dir, out, png_json)
    records[0]["segments"][0]["plural"] = not records[0]["segments"][0]["plural"]
    png_json.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"--png-json sha256: .*--overwrite"):
        run_png(fixtures_dir, out, png_json)
    assert run_png(fixtures_dir, out, png_json, None, "--overwrite").written["val"] == 1


# --------------------------------------------------------------------------------------
# 4. duplicate ids are counted and reported, not dropped silently
# --------------------------------------------------------------------------------------
def test_refcoco_duplicate_ref_ids_are_reported(fixtures_dir, tmp_path, caplog):
    instances, refs_path, refs = make_refcoco_inputs(fixtures_dir, tmp_path / "src")
    val = [r for r in refs if r["split"] == "val"]
    twin = json.loads(json.dumps(val[1]))
    twin["sentences"][0]["sent"] = "another sentence under the same id"
    refs_path.write_bytes(pickle.dumps(refs + [twin], protocol=2))
    out = tmp_path / "refcoco"
    with caplog.at_level("WARNING"):
        summary = run_refcoco(fixtures_dir, (instances, refs_path, refs), out)
    assert summary.skipped == {"duplicate ref_id in split": 1}
    assert summary.written["val"] == 7  # the first record of the id is kept
    assert "nothing skipped" not in summary.report() and "duplicate ref_id" in summary.report()
    assert json.loads((out / "build_summary.json").read_text())["skipped"] == {"duplicate ref_id in split": 1}
    assert "duplicate ref_id" in (out / "README.md").read_text()
    assert f"ref {val[1]['ref_id']}" in caplog.text
    row = next(r for r in load_dataset(str(out), split="val") if r["ref_id"] == val[1]["ref_id"])
    assert row["sentences"][0] == val[1]["sentences"][0]["sent"]
    # a resume counts the duplicate again and does not mistake the kept rows for duplicates
    summary = run_refcoco(fixtures_dir, (instances, refs_path, refs), out)
    assert summary.skipped == {"duplicate ref_id in split": 1} and summary.already_present["val"] == 7


def test_png_duplicate_narrative_ids_are_reported(fixtures_dir, tmp_path):
    record = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())[0]
    twin = json.loads(json.dumps(record))
    twin["caption"] = twin["caption"].upper()  # a different narrative under the same id
    for seg in twin["segments"]:
        seg["utterance"] = seg["utterance"].upper()
    png_json = tmp_path / "png_coco_val2017.json"
    png_json.write_text(json.dumps([record, twin]))
    out = tmp_path / "png"
    summary = run_png(fixtures_dir, out, png_json)
    assert summary.written["val"] == 1
    assert summary.skipped == {"duplicate narrative_id": 1}
    assert record["narrative_id"] in summary.examples["duplicate narrative_id"][0]
    assert "duplicate narrative_id" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------
# 5. one corrupt panoptic PNG or image is skipped and reported; bad JSON names its file
# --------------------------------------------------------------------------------------
def _png_inputs(fixtures_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Narratives on 39769 (two) and 142238 (one, over a real panoptic segment), copied folders."""
    record = json.loads((fixtures_dir / "png" / "png_format_sample_constructed.json").read_text())[0]
    twin = dict(json.loads(json.dumps(record)), narrative_id="second-on-39769")
    pan = json.loads((fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json").read_text())
    seg = next(a for a in pan["annotations"] if a["image_id"] == 142238)["segments_info"][0]
    other = {"image_id": "142238", "narrative_id": "on-142238", "caption": "a thing",
             "segments": [{"utterance": "a thing", "segment_ids": [str(seg["id"])], "plural": False, "noun": True}]}
    png_json = tmp_path / "png_coco_val2017.json"
    png_json.write_text(json.dumps([record, twin, other]))
    panoptic_dir, image_dir = tmp_path / "panoptic", tmp_path / "images"
    shutil.copytree(fixtures_dir / "coco" / "panoptic", panoptic_dir)
    shutil.copytree(fixtures_dir / "coco" / "images", image_dir)
    return png_json, panoptic_dir, image_dir


def _run_png_dirs(fixtures_dir: Path, out: Path, png_json: Path, panoptic_dir: Path, image_dir: Path,
                  panoptic_json: Path | None = None):
    return _script("build_png").main([
        "--png-json", str(png_json),
        "--panoptic-json", str(panoptic_json or fixtures_dir / "coco" / "panoptic" / "panoptic_val2017_trimmed.json"),
        "--panoptic-dir", str(panoptic_dir), "--image-dir", str(image_dir),
        "--output-dir", str(out), "--split", "val"])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_png_corrupt_panoptic_png_is_skipped_and_reported(fixtures_dir, tmp_path, damage):
    png_json, panoptic_dir, image_dir = _png_inputs(fixtures_dir, tmp_path)
    bad = panoptic_dir / "000000039769.png"
    bad.write_bytes(bad.read_bytes()[:400] if damage == "truncated" else b"\x89PNG not really")
    out = tmp_path / "png"
    summary = _run_png_dirs(fixtures_dir, out, png_json, panoptic_dir, image_dir)
    assert summary.skipped == {"panoptic png unreadable (truncated or corrupt)": 2}  # both narratives of that image
    assert "000000039769.png" in summary.examples["panoptic png unreadable (truncated or corrupt)"][0]
    assert summary.written["val"] == 1
    assert load_dataset(str(out), split="val")["narrative_id"] == ["on-142238"]
    assert "panoptic png unreadable (truncated or corrupt)" in (out / "README.md").read_text()


def test_png_corrupt_image_is_skipped_and_reported(fixtures_dir, tmp_path):
    png_json, panoptic_dir, image_dir = _png_inputs(fixtures_dir, tmp_path)
    (image_dir / "000000142238.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    summary = _run_png_dirs(fixtures_dir, tmp_path / "png", png_json, panoptic_dir, image_dir)
    assert summary.skipped == {"image file unreadable (truncated or corrupt)": 1} and summary.written["val"] == 2


@pytest.mark.parametrize("which", ["png-json", "panoptic-json"])
def test_png_json_parse_errors_name_the_file(fixtures_dir, tmp_path, which):
    png_json, panoptic_dir, image_dir = _png_inputs(fixtures_dir, tmp_path)
    broken = tmp_path / f"broken-{which}.json"
    broken.write_text('[{"image_id": "39769", "caption": "cut off her')
    args = (png_json, panoptic_dir, image_dir, broken) if which == "panoptic-json" else (broken, panoptic_dir, image_dir)
    with pytest.raises(ValueError, match=rf"--{which} {broken}: not valid JSON .*line 1"):
        _run_png_dirs(fixtures_dir, tmp_path / "png", *args)
    assert not (tmp_path / "png").exists()  # refused before anything was written


def test_refcoco_json_parse_error_names_the_file(fixtures_dir, tmp_path, refcoco_inputs):
    instances, refs_path, refs = refcoco_inputs
    instances.write_text(instances.read_text()[:100])
    with pytest.raises(ValueError, match=rf"--instances {instances}: not valid JSON"):
        run_refcoco(fixtures_dir, refcoco_inputs, tmp_path / "out")


def test_push_uploads_only_the_files_the_build_wrote(tmp_path, monkeypatch):
    import huggingface_hub

    from flmm_hf.datasets_io import push_folder_to_hub

    out = tmp_path / "shapes"
    _shapes(out)
    (out / "notes.txt").write_text("private")
    calls = {}

    class FakeApi:
        def create_repo(self, *a, **k):
            pass

        def upload_folder(self, **kwargs):
            calls.update(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    push_folder_to_hub(out, "user/shapes")
    assert sorted(calls["allow_patterns"]) == sorted(
        ["README.md", "build_summary.json"] + [f"data/{p.name}" for p in (out / "data").iterdir()]
    )
