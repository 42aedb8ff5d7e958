"""evaluate.py refuses what would give silently wrong or empty results: unknown or empty split
selections, missing dataset folders (named as such, with the builder that makes them), datasets
that are not the benchmark they are passed as; plus the overlay legend's layout.

Fast: no model is loaded (every refusal comes before it); datasets are a few synthetic scenes
built by dataset_scripts/build_shapes.py and, where a real benchmark is needed, the fixture RefCOCO refs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
