"""Training never loses what it did not write, never resumes silently wrong, and its demo folder is self-contained.

Every run is the shortened demo of `test_train.py` (a random 64 px backbone, a few scenes and steps), in
process; one tiny backbone is built once and shared.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from test_train import CONFIGS, TINY_DEMO


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """A shared demo backbone cache (built by the first run that needs it)."""
    return tmp_path_factory.mktemp("shared") / "backbone"


def _arguments(out: Path, backbone: Path | None, *extra: str):
    from flmm_hf.training import parse_arguments

    argv = ["--output_dir", str(out), "--eval_strategy", "no", "--do_eval", "false"] + TINY_DEMO + list(extra)
    if backbone is not None:
        argv += ["--demo_backbone_dir", str(backbone)]
    return parse_arguments(argv, default_config=CONFIGS / "demo.yaml")


def _train(out: Path, backbone: Path | None, *extra: str):
    """Set up and train the shortened demo; the trainer."""
    from flmm_hf.training import _train as train, setup_training

    trainer, extras = setup_training(*_arguments(out, backbone, *extra))
    train(trainer, extras["metrics"])
    return trainer


# ---------------------------------------------------------------------------------------------
# 1. Nothing in output_dir that the run did not write is replaced or rotated away
# ---------------------------------------------------------------------------------------------
def test_training_keeps_a_readme_and_checkpoints_it_did_not_write(tmp_path, backbone_dir, caplog):
    out = tmp_path / "out"
    (out / "checkpoint-1000").mkdir(parents=True)  # an older run's checkpoint, older than all of this run's
    (out / "checkpoint-1000" / "notes.txt").write_text("keep me")
    (out / "checkpoint-2").mkdir()  # the same name as a checkpoint this run saves
    (out / "checkpoint-2" / "notes.txt").write_text("keep me too")
    (out / "README.md").write_text("# My experiment notes\n")
    with caplog.at_level(logging.INFO):
        _train(out, backbone_dir, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
               "--save_total_limit", "1")
    assert (out / "README.md").read_text() == "# My experiment notes\n"
    assert (out / "checkpoint-1000" / "notes.txt").read_text() == "keep me"
    moved = list(out.glob("checkpoint-2.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "notes.txt").read_text() == "keep me too"
    # save_total_limit=1 over this run's own checkpoints: only the newest is left
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()
    log = caplog.text
    assert "README.md was not written by flmm-hf" in log and "moved it to" in log
    assert "deleting this run's checkpoint" in log and "checkpoint-1000" in log


def test_a_generated_card_is_updated_but_a_user_readme_is_not(tmp_path):
    from flmm_hf.model_card import write_model_card

    config = {"lmm_name_or_path": "llava-hf/llava-1.5-7b-hf", "use_sam": False, "lmm_config": {"model_type": "llava"}}
    write_model_card(tmp_path, config)
    generated = (tmp_path / "README.md").read_text()
    write_model_card(tmp_path, config, repo_id="me/model")  # ours: rewritten
    assert (tmp_path / "README.md").read_text() != generated
    (tmp_path / "README.md").write_text("mine")
    write_model_card(tmp_path, config)
    assert (tmp_path / "README.md").read_text() == "mine"
