"""Inputs that hostile and new users tried: thin images, no phrases, broken folders, wrong processors, bad values.

Each case either works (with the documented result) or fails with an error that names the problem and the fix.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from flmm_hf import FLMMForGrounding, FLMMProcessor
from flmm_hf.mask_head import crop_to_content
from flmm_hf.sam_refiner import sam_input_size
from tiny_models import tiny_llava, tiny_sam_config


@pytest.fixture(scope="module")
def processor(fixtures_dir) -> FLMMProcessor:
    return FLMMProcessor(AutoProcessor.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf"))


@pytest.fixture(scope="module")
def model(fixtures_dir) -> FLMMForGrounding:
    torch.manual_seed(0)
    return FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), sam=tiny_sam_config(), mask_head_channels=8)


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
