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


# ---------------------------------------------------------------------------------------------
# 2-3. Resume only from a complete checkpoint, never silently restarting the schedule
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, backbone_dir) -> Path:
    """An output_dir with checkpoint-1 and checkpoint-2 of a 2-step run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    _train(out, backbone_dir, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt"])
def test_resume_without_optimizer_or_scheduler_state_is_refused_unless_asked(tmp_path, two_checkpoints, backbone_dir, lost):
    out = _copy(two_checkpoints, tmp_path)
    (out / "checkpoint-2" / lost).unlink()
    resume = ["--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2")]
    with pytest.raises(ValueError, match=rf"lacks {lost}.*restart the learning rate.*resume_without_optimizer_state"):
        _train(out, backbone_dir, *resume)
    trainer = _train(out, backbone_dir, *resume, "--resume_without_optimizer_state", "true")
    assert trainer.state.global_step == 3


def test_resume_last_skips_a_checkpoint_cut_short_and_uses_the_newest_complete_one(tmp_path, two_checkpoints,
                                                                                    backbone_dir, caplog):
    out = _copy(two_checkpoints, tmp_path)
    # A save killed half-way: the weights truncated, no trainer_state.json yet.
    partial = out / "checkpoint-3"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((out / "checkpoint-2" / "model.safetensors").read_bytes()[:100])
    (partial / "config.json").write_text((out / "checkpoint-2" / "config.json").read_text())
    with caplog.at_level(logging.INFO):
        trainer = _train(out, backbone_dir, "--max_steps", "4", "--resume_from_checkpoint", "last")
    assert "skipped incomplete checkpoint" in caplog.text and "checkpoint-3 (missing trainer_state.json" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 4
    # 2 steps after checkpoint-2: the resumed run trained steps 3 and 4 only
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps[-2:] == [3, 4]


def test_resume_last_without_any_complete_checkpoint_names_what_each_lacks(tmp_path, two_checkpoints, backbone_dir):
    from flmm_hf.training import resolve_resume_checkpoint

    out = _copy(two_checkpoints, tmp_path)
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text('{"global_st')  # cut short
    with pytest.raises(ValueError, match=r"no complete checkpoint-N.*checkpoint-2 lacks trainer_state.json"):
        resolve_resume_checkpoint("last", out)


def _tiny_backbone_args():
    from flmm_hf.demo_backbone import DemoBackboneArguments

    return DemoBackboneArguments(image_size=32, patch_size=16, vision_hidden_size=16, vision_layers=1,
                                 text_hidden_size=16, text_layers=1, text_heads=2)


def test_an_interrupted_demo_backbone_cache_is_rebuilt(tmp_path, caplog):
    from flmm_hf.demo_backbone import CACHE_MARKER, PretrainArguments, load_or_pretrain_demo_backbone

    folder, sizes = tmp_path / "backbone", _tiny_backbone_args()
    load_or_pretrain_demo_backbone(folder, scenes=[], backbone_args=sizes, pretrain_args=PretrainArguments(steps=0))
    assert (folder / CACHE_MARKER).is_file()
    _, _, stats = load_or_pretrain_demo_backbone(folder, scenes=[], backbone_args=sizes)
    assert stats == {"pretrain_cached": 1}
    # Killed while saving: config.json written, the weights cut short, no marker yet.
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    (folder / CACHE_MARKER).unlink()
    with caplog.at_level(logging.WARNING):
        model, _, stats = load_or_pretrain_demo_backbone(
            folder, scenes=[], backbone_args=sizes, pretrain_args=PretrainArguments(steps=0))
    assert stats == {"pretrain_steps": 0} and "incomplete" in caplog.text and "rebuilding" in caplog.text
    assert (folder / CACHE_MARKER).is_file() and model.config.vision_config.image_size == 32
    # A marker but damaged weights (load fails): rebuilt too, saying why.
    weights.write_bytes(weights.read_bytes()[:200])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, _, stats = load_or_pretrain_demo_backbone(
            folder, scenes=[], backbone_args=sizes, pretrain_args=PretrainArguments(steps=0))
    assert stats == {"pretrain_steps": 0} and "does not load" in caplog.text


def test_a_folder_that_is_not_a_demo_cache_is_not_written_over(tmp_path):
    from flmm_hf.demo_backbone import PretrainArguments, load_or_pretrain_demo_backbone

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a demo backbone cache.*demo_backbone_dir"):
        load_or_pretrain_demo_backbone(folder, scenes=[], backbone_args=_tiny_backbone_args(),
                                       pretrain_args=PretrainArguments(steps=0))
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


# ---------------------------------------------------------------------------------------------
# 5. The demo says what it is doing and where its outputs are
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("progress", [True, False])
def test_backbone_pretraining_shows_a_progress_bar(monkeypatch, progress):
    import numpy as np

    import flmm_hf.demo_backbone as demo_backbone
    from flmm_hf.shapes import generate_scene

    bars = []
    real = demo_backbone.tqdm

    def recording(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        bars[-1].requested = kwargs
        return bars[-1]

    monkeypatch.setattr(demo_backbone, "tqdm", recording)
    image, objects = generate_scene(np.random.default_rng(0), image_size=32)
    scenes = [(image, [f"the {o['colour']} {o['shape']}" for o in objects], [o["mask"] for o in objects])]
    model, processor = demo_backbone.build_demo_backbone(_tiny_backbone_args())
    demo_backbone.pretrain_demo_backbone(
        model, processor, scenes, demo_backbone.PretrainArguments(steps=2, batch_size=2, warmup_steps=1), progress=progress)
    assert len(bars) == 1 and bars[0].total == 2
    # on: tqdm decides by the terminal (None: hidden when stderr is not a TTY); off: always hidden
    assert bars[0].requested["disable"] is (None if progress else True)


# ---------------------------------------------------------------------------------------------
# 4. A relative backbone folder is the model folder's, never the working directory's
# ---------------------------------------------------------------------------------------------
def _demo_model(folder: Path, words: tuple[str, ...] = ()):
    """A new F-LMM over a tiny demo backbone cached in `folder/backbone`, recorded as "backbone"."""
    from flmm_hf import FLMMForGrounding
    from flmm_hf.demo_backbone import PretrainArguments, load_or_pretrain_demo_backbone

    lmm, processor, _ = load_or_pretrain_demo_backbone(
        folder / "backbone", scenes=[], backbone_args=_tiny_backbone_args(), pretrain_args=PretrainArguments(steps=0),
        words=words)
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=8, mask_head_stages=2)
    model.config.lmm_name_or_path = "backbone"
    return model, processor


def test_a_relative_backbone_is_never_taken_from_the_working_directory(tmp_path, monkeypatch):
    from flmm_hf import FLMMForGrounding

    model, _ = _demo_model(tmp_path / "run")
    model.save_pretrained(tmp_path / "run")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy, ignore=shutil.ignore_patterns("backbone"))  # the head only
    cwd = tmp_path / "cwd"
    shutil.copytree(tmp_path / "run" / "backbone", cwd / "backbone")  # same shapes, in the working directory
    monkeypatch.chdir(cwd)
    with pytest.raises(OSError, match=r"relative to the model folder.*never used.*Fix: copy"):
        FLMMForGrounding.from_pretrained(copy)
    # From a Hub repo, the relative folder is the repo's subfolder (not ./backbone)
    import flmm_hf.frozen_parts as frozen_parts

    asked = []

    def fake_config(name, **kwargs):
        asked.append((name, kwargs))
        raise OSError("offline")

    monkeypatch.setattr(frozen_parts.AutoConfig, "from_pretrained", fake_config)
    with pytest.raises(OSError):
        frozen_parts.frozen_source("LMM", None, model.config, "org/flmm-demo", {"revision": "v1"}, "")
    assert asked == [("org/flmm-demo", {"revision": "v1", "subfolder": "backbone"})]


def test_a_saved_demo_model_loads_wherever_it_is_copied(tmp_path):
    from flmm_hf import FLMMForGrounding

    model, _ = _demo_model(tmp_path / "run")
    model.save_pretrained(tmp_path / "elsewhere")  # not where its backbone is
    assert (tmp_path / "elsewhere" / "backbone" / "model.safetensors").is_file()
    shutil.copytree(tmp_path / "elsewhere", tmp_path / "moved")
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "elsewhere")
    loaded = FLMMForGrounding.from_pretrained(tmp_path / "moved")
    assert Path(loaded.lmm.name_or_path) == tmp_path / "moved" / "backbone"
    # saving into a folder whose backbone/ is another model: refused, nothing overwritten
    other = tmp_path / "other"
    (other / "backbone").mkdir(parents=True)
    (other / "backbone" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not this model's frozen LMM"):
        loaded.save_pretrained(other)
    assert (other / "backbone" / "config.json").read_text() == "{}"


def test_a_backbone_with_another_vocabulary_is_refused(tmp_path):
    from flmm_hf.frozen_parts import check_backbone, recorded_lmm_config

    model, _ = _demo_model(tmp_path / "a")
    other, _ = _demo_model(tmp_path / "b", words=("a purple hexagon", "zebra"))
    assert other.lmm.config.text_config.vocab_size != model.lmm.config.text_config.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        check_backbone("LMM", recorded_lmm_config(model.lmm), other.lmm.config, "b", "Fix: ...")


def test_the_demo_ends_with_its_output_folder_and_a_card_of_its_own_config(tmp_path, backbone_dir, capsys):
    from flmm_hf.training import run_training

    out = tmp_path / "demo"
    args = _arguments(out, backbone_dir, "--max_steps", "1", "--overlay_examples", "1")
    args[2].do_eval = True
    metrics = run_training(*args)
    assert "eval_miou" in metrics
    last = [line for line in capsys.readouterr().out.splitlines() if line.strip()][-1]
    assert last.startswith(f"Outputs in {out.resolve()}:")
    for name in ("model.safetensors", "config.json", "README.md", "predictions.png", "all_results.json"):
        assert name in last
    card = (out / "README.md").read_text()
    assert "336" not in card and "refined by SAM" not in card and "no SAM refiner" in card
    assert "pad-to-square preprocessing at 64 x 64 pixels" in card  # the demo's image size
    assert "# F-LMM on a local llava backbone (backbone)" in card
