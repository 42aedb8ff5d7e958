"""Inputs that hostile and new users tried: thin images, no phrases, broken folders, wrong processors, bad values.

Each case either works (with the documented result) or fails with an error that names the problem and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from flmm_hf import FLMMConfig, FLMMForGrounding, FLMMProcessor
from flmm_hf.mask_head import crop_to_content
from flmm_hf.sam_refiner import sam_input_size
from tiny_models import llava_flmm_processor, tiny_flmm, tiny_llava

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processor(fixtures_dir) -> FLMMProcessor:
    return llava_flmm_processor(fixtures_dir)


@pytest.fixture(scope="module")
def model(fixtures_dir) -> FLMMForGrounding:
    return tiny_flmm(fixtures_dir)


@pytest.fixture(scope="module")
def cats(fixtures_dir) -> Image.Image:
    return Image.open(fixtures_dir / "coco" / "images" / "000000039769.png").convert("RGB")


# ---- 1. extreme aspect ratios -------------------------------------------------------------------------
def test_thin_crops_and_sam_sizes_keep_a_row_and_a_column():
    logits = torch.zeros(2, 64, 64)
    # A 50 x 10000 image letterboxed at 336: content 1 px tall, which rounds to 0 of 64 logit rows.
    assert crop_to_content(logits, (336, 336), (167, 0, 168, 336)).shape == (2, 1, 64)
    assert crop_to_content(logits, (336, 336), (0, 167, 336, 168)).shape == (2, 64, 1)
    assert crop_to_content(logits, (336, 336), (335, 0, 336, 336)).shape == (2, 1, 64)  # at the very edge
    assert crop_to_content(logits, (336, 336), (0, 0, 336, 336)).shape == (2, 64, 64)  # unchanged elsewhere
    assert sam_input_size((1, 4000)) == (1, 1024)
    assert sam_input_size((480, 640)) == (768, 1024)


@pytest.mark.parametrize("size", [(10000, 50), (50, 10000), (4000, 1)])  # PIL sizes (W, H)
@pytest.mark.parametrize("use_refiner", [True, False])
def test_extreme_aspect_ratio_images_are_grounded(model, processor, size, use_refiner):
    image = Image.new("RGB", size, (120, 60, 30))
    masks = model.ground(image, "a thin line.", ["a thin line"], processor=processor, use_refiner=use_refiner)
    assert masks.dtype == torch.bool and tuple(masks.shape) == (1, size[1], size[0])


# ---- 2. no phrases --------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_refiner", [True, False])
def test_ground_without_phrases_gives_zero_masks(model, processor, cats, use_refiner):
    masks = model.ground(cats, "two cats on a couch.", [], processor=processor, use_refiner=use_refiner)
    assert masks.dtype == torch.bool and tuple(masks.shape) == (0, 480, 640)


def test_an_example_without_phrases_in_a_batch(model, processor, cats):
    """Its outputs are empty; the other example's equal those of its own batch of one; losses stay finite."""
    text, phrases = "two cats lying on a pink blanket.", ["two cats", "a pink blanket"]
    masks = torch.zeros(2, 480, 640, dtype=torch.bool)
    masks[:, 100:300, 100:400] = True
    empty = torch.zeros(0, 480, 640, dtype=torch.bool)
    batch = processor(images=[cats, cats], texts=[text, "a couch."], phrases=[phrases, []], masks=[masks, empty])
    output = model(**batch)
    assert tuple(output.coarse_logits[1].shape[:1]) == (0,) and tuple(output.refined_logits[1].shape) == (0, 480, 640)
    alone = model(**processor(images=[cats], texts=[text], phrases=[phrases], masks=[masks]))
    torch.testing.assert_close(output.coarse_logits[0], alone.coarse_logits[0])
    torch.testing.assert_close(output.loss, alone.loss)
    nothing = model(**processor(images=[cats], texts=["a couch."], phrases=[[]], masks=[empty]))
    assert float(nothing.loss.detach()) == 0.0 and nothing.refined_logits[0].shape == (0, 480, 640)


# ---- 3. loading errors name the path, the file or the field, and the fix ------------------------------
@pytest.fixture(scope="module")
def saves(tmp_path_factory, fixtures_dir):
    """A saved base LMM, and an adapter-sized and a full save of a tiny F-LMM (no SAM) over it."""
    root = tmp_path_factory.mktemp("saves")
    tiny_llava(fixtures_dir).save_pretrained(root / "lmm")
    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(str(root / "lmm"), use_sam=False, mask_head_channels=8)
    model.save_pretrained(root / "adapter")
    model.save_pretrained(root / "full", save_mode="full")
    return root


def test_missing_or_empty_folder_says_so(saves, tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(OSError, match=f"(?s)no folder {str(missing)!r}.*Fix"):
        FLMMForGrounding.from_pretrained(missing)
    monkeypatch.chdir(tmp_path)  # a relative name that could be a Hub id: neither exists
    with pytest.raises(OSError, match="(?s)'outputs/model' is no local folder.*Fix"):
        FLMMForGrounding.from_pretrained("outputs/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="(?s)empty.*has no config.json.*is empty.*save_pretrained"):
        FLMMForGrounding.from_pretrained(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(OSError, match="(?s)has no config.json.*notes.txt"):
        FLMMForGrounding.from_pretrained(tmp_path / "other")


def test_processor_from_a_missing_folder_says_so(tmp_path):
    from flmm_hf.processing_flmm import FLMMProcessor

    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(OSError, match=f"(?s)no folder {str(missing)!r}.*Fix"):
        FLMMProcessor.from_pretrained(missing)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(OSError, match="is a file; pass the folder"):
        FLMMProcessor.from_pretrained(tmp_path / "file.json")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("where", ["adapter/model.safetensors", "full/lmm/model.safetensors"])
def test_damaged_weight_file_is_named(saves, tmp_path, where, damage):
    save = where.split("/")[0]
    folder = shutil.copytree(saves / save, tmp_path / save)
    target = tmp_path / where
    data = target.read_bytes()
    target.write_bytes(b"not a safetensors file" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(OSError) as error:
        FLMMForGrounding.from_pretrained(folder)
    message = str(error.value)
    assert str(target) in message and "damaged or incomplete" in message and "Fix" in message


def test_misspelt_config_field_is_named_with_the_valid_one(saves, tmp_path):
    folder = shutil.copytree(saves / "adapter", tmp_path / "typo")
    config = json.loads((folder / "config.json").read_text())
    config["mask_head_channel"] = config.pop("mask_head_channels")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'mask_head_channel'.*did you mean 'mask_head_channels'"):
        FLMMForGrounding.from_pretrained(folder)
    with pytest.raises(ValueError, match="'atention_layers'.*'attention_layers'"):
        FLMMConfig(atention_layers=[0])
    FLMMConfig(transformers_version="5.0.0", dtype="float32")  # what save_pretrained writes stays accepted


# ---- 4. processors that are not FLMMProcessor ----------------------------------------------------------
def test_backbone_processor_class_must_be_a_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "flmm_processor_config.json").read_text())
    for name in ("AutoModel", "LlavaForConditionalGeneration", "LlamaTokenizer"):
        (tmp_path / "flmm_processor_config.json").write_text(json.dumps(dict(settings, backbone_processor_class=name)))
        with pytest.raises(ValueError, match=f"(?s)flmm_processor_config.json.*{name}.*not a transformers processor"):
            FLMMProcessor.from_pretrained(tmp_path)
    (tmp_path / "flmm_processor_config.json").write_text(json.dumps(dict(settings, backbone_processor_class="AutoProcessor")))
    assert type(FLMMProcessor.from_pretrained(tmp_path).processor).__name__ == "LlavaProcessor"


def test_a_plain_backbone_processor_is_refused_with_the_fix(model, processor, cats, tmp_path):
    processor.save_pretrained(tmp_path)
    plain = AutoProcessor.from_pretrained(tmp_path)  # no trust_remote_code: the backbone's own processor
    assert not isinstance(plain, FLMMProcessor)
    with pytest.raises(TypeError, match="(?s)LlavaProcessor, not an FLMMProcessor.*FLMMProcessor.from_pretrained.*trust_remote_code=True"):
        model.ground(cats, "two cats.", ["two cats"], processor=plain)
    inputs = plain(images=[cats], text=["USER: <image>\nhi ASSISTANT: two cats."], return_tensors="pt")
    with pytest.raises(ValueError, match="(?s)lack phrase_ids, original_sizes.*FLMMProcessor.from_pretrained"):
        model(**inputs)


# ---- 5. input checks --------------------------------------------------------------------------------
def test_text_beyond_the_position_limit_warns_with_the_counts(model, processor, cats, caplog):
    text = "two cats " + "and a very long story " * 120 + "end."
    with caplog.at_level(logging.WARNING, logger="flmm_hf.modeling_flmm"):
        model.ground(cats, text, ["two cats"], processor=processor, use_refiner=False)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "position limit of 1024" in warning and "max_position_embeddings" in warning
    assert int(warning.split("sequence has ")[1].split()[0]) > 1024
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flmm_hf.modeling_flmm"):
        model.ground(cats, "two cats.", ["two cats"], processor=processor, use_refiner=False)
    assert not caplog.records


@pytest.mark.parametrize("masks", [torch.full((1, 480, 640), 0.3), torch.full((1, 480, 640), 2), torch.full((1, 480, 640), float("nan"))])
def test_soft_masks_are_refused(processor, cats, masks):
    with pytest.raises(ValueError, match="(?s)masks must be boolean or hold only 0 and 1.*masks > 0.5"):
        processor(images=cats, texts="two cats.", phrases=["two cats"], masks=masks)


def test_zero_one_masks_are_read_as_masks(processor, cats):
    masks = torch.zeros(1, 480, 640)
    masks[0, :10] = 1
    out = processor(images=cats, texts="two cats.", phrases=["two cats"], masks=masks.numpy().astype("uint8"))
    assert out["masks"][0].dtype == torch.bool and int(out["masks"][0].sum()) == 6400


@pytest.mark.parametrize("threshold", [float("nan"), 2.0, -0.1, "0.5"])
def test_threshold_must_be_a_probability(model, processor, cats, threshold):
    with pytest.raises(ValueError, match="threshold must be a probability"):
        model.ground(cats, "two cats.", ["two cats"], processor=processor, threshold=threshold)
    with pytest.raises(ValueError, match="threshold must be a probability"):
        processor.post_process_masks([torch.zeros(1, 4, 4)], [(8, 8)], threshold=threshold)


def test_letterbox_and_question_types_are_checked(processor, cats):
    with pytest.raises(TypeError, match="letterbox must be True, False or None"):
        FLMMProcessor(processor.processor, letterbox="no")
    with pytest.raises(TypeError, match="question must be a str, None"):
        processor(images=cats, question=5)
    # None means the processor's own question, for one image and per image.
    assert torch.equal(processor(images=cats, question=None)["input_ids"], processor(images=cats)["input_ids"])


def test_images_above_the_pixel_limit_are_refused(processor, cats, monkeypatch):
    huge = Image.new("RGB", (8000, 8000))  # 64 megapixels
    with pytest.raises(ValueError, match="(?s)8000x8000 \\(64.0 megapixels\\).*limit of 40 megapixels.*thumbnail"):
        processor(images=[huge], texts=["x."], phrases=[["x"]])
    monkeypatch.setattr(processor, "max_image_pixels", 1000)
    with pytest.raises(ValueError, match="limit"):
        processor(images=cats)
    monkeypatch.setattr(processor, "max_image_pixels", None)
    processor(images=cats, return_sam_inputs=False)


def test_from_lmm_names_the_default_sam_and_the_fix(fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: SAM cannot be found offline
    with pytest.raises(OSError, match="(?s)facebook/sam-vit-large.*default SAM.*use_sam=False"):
        FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir))


def test_demo_shows_errors_as_a_message(cats):
    spec = importlib.util.spec_from_file_location("flmm_demo_app_errors", REPO_ROOT / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)

    class Failing:
        def __init__(self, error):
            self.error = error

        def chat(self, *args, **kwargs):
            raise self.error

    for error in (ValueError("bad threshold"), RuntimeError("out of memory"), TypeError("not an FLMMProcessor")):
        messages, segments, colours, picture, status = app.respond(
            Failing(error), None, cats, "what is it?", "", False, "auto", 8
        )
        assert status == f"Error: {error}" and picture is cats and messages[0]["content"] == "what is it?"


def test_a_relative_local_backbone_is_recorded_absolute(fixtures_dir, tmp_path, monkeypatch):
    """from_lmm('models/llava') from one working directory; the save loads from any other (and a folder of
    that name in the new working directory is never mistaken for it)."""
    tiny_llava(fixtures_dir).save_pretrained(tmp_path / "models" / "llava")
    monkeypatch.chdir(tmp_path)
    model = FLMMForGrounding.from_lmm("models/llava", use_sam=False, mask_head_channels=8)
    assert model.config.lmm_name_or_path == str(tmp_path / "models" / "llava")
    model.save_pretrained(tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models" / "llava").mkdir(parents=True)  # same relative name, no model in it
    monkeypatch.chdir(elsewhere)
    loaded = FLMMForGrounding.from_pretrained(tmp_path / "out")
    assert loaded.lmm.name_or_path == str(tmp_path / "models" / "llava")
