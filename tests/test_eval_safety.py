"""evaluate.py refuses what would give silently wrong or empty results: unknown or empty split
selections, missing dataset folders (named as such, with the builder that makes them), datasets
that are not the benchmark they are passed as; plus the overlay legend's layout.

Fast: no model is loaded (every refusal comes before it); datasets are a few synthetic scenes
built by dataset_scripts/build_shapes.py and, where a real benchmark is needed, the fixture RefCOCO refs.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Sequence

import pytest

from flmm_hf.evaluation import EvaluationArguments, build_tasks

REPO = Path(__file__).resolve().parents[1]


def _builder(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_shapes(out: Path, *extra: str) -> Path:
    _builder("build_shapes").main(
        ["--output-dir", str(out), "--train-scenes", "1", "--val-scenes", "1", "--test-scenes", "1",
         "--image-size", "64", *extra]
    )
    return out


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """A shapes folder with train / val / test (one scene each)."""
    return _build_shapes(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="module")
def shapes_train_only(tmp_path_factory) -> Path:
    """A shapes folder with only a train split."""
    return _build_shapes(tmp_path_factory.mktemp("shapes_train") / "shapes", "--split", "train")


# --------------------------------------------------------------------------------------
# 1. split selection
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, splits, expected",
    [
        ({"refcoco": "x"}, ["bogus"], ["'bogus'", "RefCOCO (--refcoco): val, testA, testB"]),
        ({"png": "x", "refcocog": "y"}, ["val", "nope"], ["'nope'", "PNG (--png): val", "RefCOCOg (--refcocog): val, test"]),
        ({"refcoco": "x"}, ["testa"], ["did you mean 'testA'"]),
        ({"refcoco_plus": "x"}, ["test"], ["'test'", "RefCOCO+"]),  # a RefCOCOg split only
        ({"refcoco": "x"}, [], ["splits is empty"]),
    ],
)
def test_unknown_or_empty_splits_are_refused_at_parse_time(kwargs, splits, expected):
    with pytest.raises(ValueError) as info:
        EvaluationArguments(splits=splits, **kwargs)
    for text in expected:
        assert text in str(info.value)


def test_a_given_dataset_left_without_splits_is_refused():
    # `test` is a RefCOCOg split, so it is known, but RefCOCO would be silently skipped
    with pytest.raises(ValueError, match=r"selects no split of RefCOCO \(has val, testA, testB\).*--refcoco\b"):
        EvaluationArguments(refcoco="x", refcocog="y", splits=["test"])


def test_cli_with_bogus_split_fails_before_loading_anything():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(ValueError, match="unknown split"):
        script.main(["--model_name_or_path", "not-loaded", "--refcoco", "data/refcoco", "--splits", "bogus"])


def test_dataset_without_any_selected_split_is_refused(shapes_train_only):
    args = EvaluationArguments(refcoco=str(shapes_train_only))
    with pytest.raises(ValueError, match=r"has none of the splits to evaluate \(val, testA, testB\); it has train"):
        build_tasks(args)


def test_protocols_empty_is_refused():
    with pytest.raises(ValueError, match="protocols is empty"):
        EvaluationArguments(refcoco="x", protocols=[])


# --------------------------------------------------------------------------------------
# 2. a missing local dataset folder is reported as one, with the builder that makes it
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, source, builder",
    [
        ("refcoco", "data/png", "build_refcoco.py --dataset refcoco "),  # no data/ here: could be a Hub id
        ("png", "data/png", "build_png.py"),
        ("refcoco_plus", "./refcoco+", "build_refcoco.py --dataset refcoco+ "),
        ("refcocog", "out/data/refcocog", "build_refcoco.py --dataset refcocog "),
        ("png", "{tmp}/missing", "build_png.py"),  # absolute, and its parent exists
        ("refcoco", "{tmp}/a/b/c", "build_refcoco.py"),
        ("refcoco", "~/no-such-folder-here/refcoco", "build_refcoco.py"),
        ("png", "exists/png", "build_png.py"),  # the parent folder exists: a path
    ],
)
def test_missing_dataset_folder_is_named_with_its_builder(flag, source, builder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists").mkdir()
    source = source.format(tmp=tmp_path)
    args = EvaluationArguments(**{flag: source})
    with pytest.raises(FileNotFoundError) as info:
        build_tasks(args)
    message = str(info.value)
    assert f"{source!r}" in message and builder in message and f"--output-dir {source}" in message
    assert "on the Hub" not in message.split("(")[0]  # not reported as a Hub failure first


def test_empty_or_file_dataset_folder_is_refused_with_builder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"holds no data files.*build_png\.py"):
        build_tasks(EvaluationArguments(png=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match=r"is a file, not a dataset folder.*build_refcoco\.py"):
        build_tasks(EvaluationArguments(refcoco=str(tmp_path / "file.txt")))


def test_training_load_split_names_a_missing_folder(tmp_path, monkeypatch):
    from flmm_hf.training import load_split

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"dataset folder 'data/refcoco' does not exist.*build_refcoco\.py.*"
                                                r"build_png\.py.*build_shapes\.py"):
        load_split("data/refcoco", "train", concat_refs=False)


def test_existing_folder_still_loads(shapes_dir):
    from flmm_hf.evaluation import load_dataset_source, looks_like_local_path

    assert sorted(load_dataset_source(str(shapes_dir))) == ["test", "train", "val"]
    assert not looks_like_local_path("org/refcoco") and not looks_like_local_path("refcoco")
    assert looks_like_local_path("org/refcoco/extra") and looks_like_local_path("..\\refcoco")


# --------------------------------------------------------------------------------------
# 3. a dataset that is not the benchmark it was passed as is labelled by its own name
# --------------------------------------------------------------------------------------
SHAPES_NAME = "F-LMM synthetic shapes (referring segmentation demo)"  # build_shapes.py's card pretty_name


@pytest.fixture(scope="module")
def refcoco_dir(fixtures_dir, tmp_path_factory) -> Path:
    """The real builder's RefCOCO folder from the fixture refs (val split only)."""
    import pickle

    from test_datasets import make_refcoco_inputs

    root = tmp_path_factory.mktemp("refcoco")
    instances, _, refs = make_refcoco_inputs(fixtures_dir, root / "src")
    refs_path = root / "refs_val.p"
    refs_path.write_bytes(pickle.dumps([r for r in refs if r["split"] == "val"][:2], protocol=2))
    _builder("build_refcoco").main(["--dataset", "refcoco", "--instances", str(instances), "--refs", str(refs_path),
                                    "--image-dir", str(fixtures_dir / "coco" / "images"),
                                    "--output-dir", str(root / "refcoco")])
    return root / "refcoco"


def test_tasks_carry_the_dataset_cards_name(shapes_dir, refcoco_dir, caplog):
    shapes = build_tasks(EvaluationArguments(refcocog=str(shapes_dir), protocols=["split"]))
    assert {task.label for task in shapes} == {SHAPES_NAME}
    assert "is 'F-LMM synthetic shapes" in caplog.text and "not RefCOCOg" in caplog.text
    real = build_tasks(EvaluationArguments(refcoco=str(refcoco_dir), protocols=["split"]))
    assert {task.label for task in real} == {"RefCOCO"}  # the real benchmark keeps its name


def test_shapes_passed_as_refcoco_are_not_reported_as_refcoco(shapes_dir, fixtures_dir, tmp_path):
    """End to end with the tiny model: the table, the JSON and the model-index name the shapes set."""
    import json

    import torch
    from transformers import AutoProcessor

    from flmm_hf import FLMMForGrounding, FLMMProcessor
    from flmm_hf.evaluation import model_index_results, results_table, run_evaluation
    from tiny_models import tiny_llava

    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), use_sam=False, mask_head_channels=8).eval()
    processor = FLMMProcessor(AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))
    args = EvaluationArguments(refcoco=str(shapes_dir), splits=["val"], protocols=["split"], max_samples=1,
                               output_dir=str(tmp_path / "out"))
    output = run_evaluation(args, model=model, processor=processor)
    table = results_table(output)
    assert SHAPES_NAME in table and "RefCOCO" not in table
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["dataset_labels"] == {"refcoco": SHAPES_NAME}
    for entry in model_index_results(output):
        assert entry["dataset"]["name"] == SHAPES_NAME
        assert "refcoco" not in entry["dataset"]["type"]


# --------------------------------------------------------------------------------------
# 4. pycocotools' numpy-2 DeprecationWarning: silenced where we decode and in pytest, nothing else
# --------------------------------------------------------------------------------------
def _decode_warnings(decode, filters: Sequence[tuple] = ()) -> list[warnings.WarningMessage]:
    """DeprecationWarnings raised by ``decode(rle)``, every warning shown except those ``filters`` ignore."""
    import numpy as np

    from flmm_hf.datasets_io import mask_to_rle

    rle = mask_to_rle(np.eye(6, dtype=bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for action, message, category, module, lineno in filters:
            warnings.filterwarnings(action, message, category, module, lineno)
        decode(rle)
    return [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_rle_to_mask_emits_no_pycocotools_deprecation_warning():
    from flmm_hf.datasets_io import rle_to_mask

    assert _decode_warnings(rle_to_mask) == []


def test_pytest_config_filters_exactly_that_warning(request):
    from _pytest.config import parse_warning_filter
    from pycocotools import mask as mask_utils

    def raw_decode(rle):
        mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})

    assert _decode_warnings(raw_decode), "pycocotools no longer warns: drop the filter in setup.cfg"
    filters = [parse_warning_filter(line, escape=False) for line in request.config.getini("filterwarnings")]
    assert _decode_warnings(raw_decode, filters) == []
    assert all(f[0] == "ignore" and f[2] is DeprecationWarning and f[1] for f in filters)  # narrow filters only


def test_builder_output_folder_data_is_git_ignored():
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/refcoco/data/val-00000.parquet"], cwd=REPO)
    assert ignored.returncode == 0, "data/ (where the README's builders write) must be git-ignored"
    kept = subprocess.run(["git", "check-ignore", "-q", "flmm_hf/data.py"], cwd=REPO)
    assert kept.returncode == 1  # only the top-level folder, not files named data elsewhere


# --------------------------------------------------------------------------------------
# 5. README: how to get the CPU torch; the bad-input table quotes what the code really says
# --------------------------------------------------------------------------------------
README = (REPO / "README.md").read_text()


def test_readme_says_how_to_get_the_cpu_torch_and_ci_keeps_its_pin():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "pip install --quiet torch==2.13.0 " in (REPO / ".ci" / "run").read_text()


def _message(call) -> str:
    try:
        call()
    except Exception as error:  # the table quotes any error type
        return f"{type(error).__name__}: {error}"
    raise AssertionError("no error raised")


def _quoted_start(message: str, length: int) -> str:
    """The start of ``message``, as a table cell must quote it."""
    return message[:length]


def test_bad_input_table_quotes_the_real_messages(fixtures_dir, tmp_path, monkeypatch):
    import pickle

    from transformers import AutoProcessor

    from flmm_hf import FLMMProcessor
    from flmm_hf.datasets_io import safe_pickle_loads

    assert "## When the input is wrong" in README and "(#when-the-input-is-wrong)" in README
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    processor = FLMMProcessor(AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))
    from PIL import Image

    image = Image.new("RGB", (16, 16))
    cases = [
        (lambda: EvaluationArguments(refcoco="x", splits=["bogus"]), 110),
        (lambda: EvaluationArguments(refcoco="x", refcocog="y", splits=["test"]), 200),
        (lambda: build_tasks(EvaluationArguments(refcoco="data/png")), 102),  # data/ exists: a path
        (lambda: EvaluationArguments(refcoco="x", protocols=[]), 32),
        (lambda: safe_pickle_loads(pickle.dumps(os_system())), 60),
        (lambda: processor(images=image, texts="a cat", phrases="the cat"), 200),
        (lambda: processor(images=image, texts="a cat", phrases=["cat", "dog"]), 60),
        (lambda: processor(images=[image, image], texts=["a"], phrases=[["a"], ["a"]]), 200),
        (lambda: processor(images=[], texts=[]), 200),
        (lambda: FLMMProcessor(processor.processor, prompt_template="{input}"), 60),
    ]
    for call, length in cases:
        quoted = _quoted_start(_message(call), length)
        assert quoted in README, f"README's bad-input table does not quote {quoted!r}"


def os_system():
    import os

    return os.system


# --------------------------------------------------------------------------------------
# 6. the overlay picture: prediction beside ground truth, one swatch + phrase per legend line
# --------------------------------------------------------------------------------------
def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(box: tuple, outer: tuple) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


@pytest.mark.parametrize("size", [(64, 48), (16, 300), (300, 40)])
def test_overlay_legend_lines_neither_overlap_nor_leave_the_tile(size, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from flmm_hf.demo import save_overlay

    w, h = size
    images = [Image.new("RGB", (w, h), (90, 90, 90)) for _ in range(3)]
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[:, : h // 2, : w // 2] = True
    phrases = [["the red circle on the left of the big blue square near the top right corner"] * 4,
               ["a", "b", "c", "d"], ["x" * 300, "y", "the", "last"]]
    texts = ["a caption " * 30, "short", ""]
    path = tmp_path / "overlay.png"
    layout = save_overlay(images, [masks] * 3, [masks] * 3, path, texts=texts, columns=2, phrases=phrases)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1::-1] == layout.size and len(layout.tiles) == 3
    assert [line.colour for line in layout.legend if line.tile == 0][1:] == [
        (255, 0, 0), (0, 200, 255), (255, 200, 0), (0, 255, 0)]  # one swatch per phrase, in palette order
    for tile, tile_box in enumerate(layout.tiles):
        lines = [line for line in layout.legend if line.tile == tile]
        assert len(lines) == 1 + 4  # the caption, then one line per phrase
        boxes = [line.text_box for line in lines] + [line.swatch for line in lines if line.swatch]
        for j, a in enumerate(boxes):
            assert _inside(a, tile_box), (tile, a, tile_box)
            assert not any(_overlap(a, b) for b in boxes[j + 1:]), (tile, a)
        # every lit pixel of the legend strip lies in a reported box: the layout is what was drawn
        x0, _, x1, y1 = tile_box
        strip = picture[layout.legend_top[tile]:y1, x0:x1].any(axis=2)
        drawn = np.zeros_like(strip)
        for bx0, by0, bx1, by1 in boxes:
            drawn[by0 - layout.legend_top[tile]:by1 - layout.legend_top[tile], bx0 - x0:bx1 - x0] = True
        assert not (strip & ~drawn).any()
        # the prediction is drawn beside the ground truth: two image panels side by side in the tile
        assert tile_box[2] - tile_box[0] >= 2 * w


def test_prediction_overlay_names_each_phrase(tmp_path, shapes_dir):
    import torch
    from datasets import load_dataset

    from flmm_hf.data import group_refs_by_image
    from flmm_hf.demo import save_prediction_overlay
    from flmm_hf.evaluation import MaskPrediction

    rows = group_refs_by_image(load_dataset(str(shapes_dir), split="val"), keep_in_memory=True)
    k = len(rows[0]["ref_ids"])
    h, w = rows[0]["height"], rows[0]["width"]
    prediction = MaskPrediction(0, torch.zeros(k, h, w, dtype=torch.bool), torch.zeros(k, h, w, dtype=torch.bool))
    layout = save_prediction_overlay(rows, [prediction], tmp_path / "p.png")
    assert [line.text for line in layout.legend] == [s[0] for s in rows[0]["raw_sentences"]]
