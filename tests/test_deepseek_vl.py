"""DeepSeek-VL in reproduction mode: the original F-LMM's image inputs, with transformers' processors.

The original F-LMM preprocesses DeepSeek-VL with DeepSeek-VL's own `VLMImageProcessor` and vision
tower (read from the reference repository):

- letterbox: each side `max(int(length / longer * side), min_size=14)`, PIL bicubic (torchvision's
  resize of a PIL image), pasted centred (odd pixel after) on `int(255 * mean)` of the processor's
  mean; DeepSeek-VL-1.3B at 384 (SigLIP mean 0.5 -> 127), DeepSeek-VL-7B at 1024 (CLIP mean ->
  (122, 116, 104));
- DeepSeek-VL-7B's hybrid vision tower gives the SAM branch that 1024 letterbox (normalised with
  CLIP's mean/std) and the SigLIP branch `torchvision.transforms.Resize(384, antialias=True)` of it
  (bilinear with antialiasing on the float [0, 1] tensor, normalised with 0.5/0.5).

The processors here are transformers' DeepSeek-VL processors with the settings of the converted
Hub checkpoints (transformers' conversion script: SigLIP branch `IMAGENET_STANDARD` mean/std and
bilinear resampling, SAM branch CLIP mean/std) around the LLaVA tokenizer of the fixtures (no
DeepSeek tokenizer can be downloaded); the tiny models are random.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoTokenizer,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessorPil,
    DeepseekVLHybridProcessor,
    DeepseekVLImageProcessorPil,
    DeepseekVLProcessor,
)
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)

from flmm_hf import FLMMForGrounding
from flmm_hf.grounded_chat import generate_text
from flmm_hf.image_layout import SquareLayout, get_image_layout
from flmm_hf.mask_head import crop_to_content
from flmm_hf.processing_flmm import FLMMProcessor, deepseek_letterbox_geometry, letterbox_geometry
from tiny_models import tiny_sam_config

# A DeepSeek-style chat template of our own (the prompt is not what these tests check).
CHAT_TEMPLATE = (
    "{% for message in messages %}User: {% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% else %}{{ content['text'] }}{% endif %}{% endfor %}\n\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
CLIP_PAD = (122, 116, 104)  # int(255 * CLIP mean)
SIGLIP_PAD = (127, 127, 127)  # int(255 * 0.5)


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir):
    return AutoTokenizer.from_pretrained(fixtures_dir / "tokenizers" / "llava-1.5-7b-hf")


def hybrid_processor(tokenizer, size: int = 384, high_res_size: int = 1024, num_image_tokens: int = 576):
    """transformers' DeepSeek-VL-7B processor with the converted checkpoint's image settings."""
    image_processor = DeepseekVLHybridImageProcessorPil(
        size={"height": size, "width": size},
        high_res_size={"height": high_res_size, "width": high_res_size},
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        high_res_image_mean=OPENAI_CLIP_MEAN,
        high_res_image_std=OPENAI_CLIP_STD,
        resample=PILImageResampling.BILINEAR,
    )
    return DeepseekVLHybridProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
    )


@pytest.fixture(scope="module")
def hybrid(tokenizer) -> FLMMProcessor:
    return FLMMProcessor(hybrid_processor(tokenizer))


@pytest.fixture(scope="module")
def deepseek_1b(tokenizer) -> FLMMProcessor:
    image_processor = DeepseekVLImageProcessorPil(
        size={"height": 384, "width": 384}, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD
    )
    processor = DeepseekVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return FLMMProcessor(processor)


@pytest.fixture(scope="module")
def images(fixtures_dir) -> dict[str, Image.Image]:
    folder = fixtures_dir / "coco" / "images"
    bears = Image.open(folder / "COCO_train2014_000000157714.jpg").convert("RGB")  # 640x480 (W x H)
    return {
        "landscape": bears,
        "portrait": Image.open(folder / "COCO_train2014_000000363252.jpg").convert("RGB"),  # 375x500
        "odd": Image.open(folder / "COCO_train2014_000000460370.jpg").convert("RGB"),  # 640x427
        "strip": bears.crop((0, 200, 640, 208)),  # 640x8: thinner than DeepSeek's 14-pixel floor at 1024
        "short": bears.crop((0, 0, 640, 361)),  # 640x361: its 384 and 1024 letterboxes crop 64 logits differently
    }


def original_letterbox(image: Image.Image, side: int, pad: tuple[int, int, int]) -> tuple[Image.Image, int, int]:
    """DeepSeek-VL's VLMImageProcessor letterbox, written from its description: (square, top, left)."""
    width, height = image.size
    longer = max(width, height)
    new_h, new_w = max(int(height / longer * side), 14), max(int(width / longer * side), 14)
    square = Image.new("RGB", (max(new_w, new_h),) * 2, pad)
    top, left = (square.height - new_h) // 2, (square.width - new_w) // 2
    square.paste(image.resize((new_w, new_h), Image.BICUBIC), (left, top))
    return square, top, left


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255).float()[None]


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def denormalise_to_255(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255


# ---------------------------------------------------------------------------------- DeepSeek-VL-7B
@pytest.mark.parametrize(
    "name, box",
    [
        ("landscape", [128, 0, 896, 1024]),  # 480/640*1024 = 768 rows, 128 above and below
        ("portrait", [0, 128, 1024, 896]),  # 375/500*1024 = 768 columns
        ("odd", [170, 0, 853, 1024]),  # 427/640*1024 = 683.2 -> 683 rows, 170 above, 171 below
        ("strip", [505, 0, 519, 1024]),  # 8/640*1024 = 12.8 -> 12 < 14: the floor keeps 14 rows
    ],
)
def test_7b_high_res_branch_is_the_original_1024_letterbox(hybrid, images, name, box):
    image = images[name]
    out = hybrid(image, "a white bear.", ["white bear"], return_sam_inputs=False)
    assert out["canvas_sizes"].tolist() == [[1024, 1024]] and out["content_boxes"].tolist() == [box]
    assert out["original_sizes"].tolist() == [[image.height, image.width]]
    high = out["high_res_pixel_values"]
    assert high.shape == (1, 3, 1024, 1024)

    # the pad pixels are the CLIP mean colour as 0-255 ints (away from the bicubic support of the edge)
    top, left, bottom, right = box
    pixels = denormalise_to_255(high, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[0]
    pad = torch.tensor(CLIP_PAD, dtype=torch.float32).view(3, 1, 1)
    for region in (pixels[:, : max(top - 2, 0)], pixels[:, bottom + 2 :], pixels[:, :, : max(left - 2, 0)],
                   pixels[:, :, right + 2 :]):
        if region.numel():
            torch.testing.assert_close(region, pad.expand_as(region), atol=1e-3, rtol=0)
    inner = pixels[:, top + 2 : bottom - 2, left + 2 : right - 2]
    assert (inner - pad).abs().amax(dim=0).mean() > 10  # image content, not padding

    # independent construction, as the original: resize the image itself to 1024, pad, normalise
    square, expected_top, expected_left = original_letterbox(image, 1024, CLIP_PAD)
    assert (expected_top, expected_left) == (top, left)
    expected = normalise(to_unit_tensor(square), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert (high - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["landscape", "odd"])
def test_7b_low_res_branch_is_a_384_resize_of_the_1024_letterbox(hybrid, images, name):
    image = images[name]
    out = hybrid(image, "a white bear.", ["white bear"], return_sam_inputs=False)
    low = out["pixel_values"]
    assert low.shape == (1, 3, 384, 384) and low.dtype == torch.float32

    # the original's vision tower: torchvision Resize(384, antialias=True) of the float [0, 1] letterbox
    # (bilinear, align_corners=False, antialiased), then SigLIP's 0.5/0.5 normalisation
    square, _, _ = original_letterbox(image, 1024, CLIP_PAD)
    resized = F.interpolate(to_unit_tensor(square), size=(384, 384), mode="bilinear", align_corners=False,
                            antialias=True)
    expected = normalise(resized, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)
    assert (low - expected).abs().max() < 1e-5
    # the pad rows stay the CLIP mean colour: a 384 resize of the 1024 letterbox, not a 384 letterbox
    top_rows = denormalise_to_255(low, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)[0, :, :40]
    pad = torch.tensor(CLIP_PAD, dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(top_rows, pad.expand_as(top_rows), atol=1e-3, rtol=0)

    # transformers' own SigLIP input (8-bit PIL resize of the same letterbox) is not the original's
    own = hybrid.processor(images=[[hybrid.lmm_image(image)[0]]], text=["<image>"], return_tensors="pt")
    assert (own["pixel_values"] - expected).abs().max() > 1e-3
    assert (own["high_res_pixel_values"] - out["high_res_pixel_values"]).abs().max() == 0


def test_7b_geometry_crops_the_mask_logits_as_the_original(hybrid, images):
    # The original crops the 64x64 logits predicted on the letterbox with the 1024 letterbox's
    # metadata: start int(before * 64 / 1024), extent int(content * 64 / 1024 + 0.5). For a 640x361
    # image that is 361/640*1024 = 577.6 -> 577 rows after 223 rows of padding: rows 13..49 (a 384
    # letterbox, 216 rows after 84, would start at row 14).
    out = hybrid(images["short"], "a white bear.", ["white bear"], return_sam_inputs=False)
    assert out["content_boxes"].tolist() == [[223, 0, 800, 1024]]
    logits = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    cropped = crop_to_content(logits, out["canvas_sizes"][0].tolist(), out["content_boxes"][0].tolist())
    start, extent = int(223 * 64 / 1024), int(577 * 64 / 1024 + 0.5)
    assert (start, extent) == (13, 36)
    assert torch.equal(cropped, logits[:, start : start + extent, :])


def test_7b_is_a_registered_family_and_native_mode_is_the_backbone_processor(tokenizer, images, caplog):
    caplog.set_level(logging.WARNING)
    processor = hybrid_processor(tokenizer)
    reproduction = FLMMProcessor(processor)
    # the 7B checkpoint's SigLIP branch (transformers' conversion script): 384 px, patch 16
    config = DeepseekVLHybridConfig(vision_config=dict(model_type="siglip_vision_model", image_size=384, patch_size=16))
    layout = get_image_layout(config)
    assert type(layout) is SquareLayout and layout.side == 24  # 576 tokens, one square grid
    assert reproduction.model_type == "deepseek_vl_hybrid" and reproduction.pad_color == CLIP_PAD
    fallbacks = ("No image layout", "no registered family")
    assert not [r for r in caplog.records if any(text in r.getMessage() for text in fallbacks)]

    native = FLMMProcessor(processor, mode="native")
    assert not native.letterbox and native.reproduction_image_inputs([images["odd"]]) == {}
    out = native(images["odd"], "a white bear.", ["white bear"], return_sam_inputs=False)
    assert out["canvas_sizes"].tolist() == [[427, 640]] and out["content_boxes"].tolist() == [[0, 0, 427, 640]]
    own = processor(images=[[images["odd"]]], text=["<image>"], return_tensors="pt")
    assert torch.equal(out["pixel_values"], own["pixel_values"])
    assert torch.equal(out["high_res_pixel_values"], own["high_res_pixel_values"])


@pytest.fixture(scope="module")
def tiny_7b(tokenizer):
    """A random DeepSeek-VL-7B-shaped model: SigLIP 32 px / patch 8 (a 4x4 grid), SAM 64 px, and its processor."""
    config = DeepseekVLHybridConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        high_res_vision_config=dict(model_type="sam_vision_model", hidden_size=32, output_channels=16,
                                    num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8,
                                    global_attn_indexes=[1], mlp_dim=64),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    lmm = DeepseekVLHybridForConditionalGeneration(config).eval()
    model = FLMMForGrounding.from_lmm(lmm, sam=tiny_sam_config(), mask_head_channels=8)
    return model, FLMMProcessor(hybrid_processor(tokenizer, size=32, high_res_size=64, num_image_tokens=16))


def test_7b_tiny_model_forward_on_the_processor_output(tiny_7b, images):
    model, processor = tiny_7b
    image = images["odd"]  # 640x427 -> 64x42 content at rows 11..53 of the 64 letterbox
    masks = torch.zeros(1, image.height, image.width, dtype=torch.bool)
    masks[0, 100:300, 200:400] = True
    inputs = processor(image, "a white bear.", ["white bear"], masks=[masks[0].numpy()])
    assert inputs["canvas_sizes"].tolist() == [[64, 64]] and inputs["content_boxes"].tolist() == [[11, 0, 53, 64]]
    assert inputs["pixel_values"].shape == (1, 3, 32, 32) and inputs["high_res_pixel_values"].shape == (1, 3, 64, 64)
    with torch.no_grad():
        output = model(**inputs)
    assert torch.isfinite(output.loss)
    # coarse logits: 4x4 maps upsampled to 64x64, cropped as the original: int(11 * 64 / 64), int(42 + 0.5)
    assert tuple(output.coarse_logits[0].shape) == (1, 42, 64)
    assert tuple(output.refined_logits[0].shape) == (1, 427, 640)

    # a batch gets each image's own inputs
    batch = processor([image, images["portrait"]], ["a white bear.", "a man."], [["white bear"], ["man"]])
    single = processor(images["portrait"], "a man.", ["man"])
    assert batch["content_boxes"].tolist() == [[11, 0, 53, 64], [0, 8, 64, 56]]  # 375/500*64 = 48 columns
    for key in ("pixel_values", "high_res_pixel_values"):
        assert torch.equal(batch[key][1], single[key][0])


def test_7b_chat_generation_sees_the_reproduction_pixels(tiny_7b, images, monkeypatch):
    model, processor = tiny_7b
    seen = {}
    real_generate = model.lmm.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model.lmm, "generate", spy)
    generate_text(model, [images["landscape"]], "What is this?", processor, max_new_tokens=1)
    expected = processor.reproduction_image_inputs([processor.lmm_image(images["landscape"])[0]])["pixel_values"]
    assert torch.equal(seen["pixel_values"], expected)
    assert seen["high_res_pixel_values"].shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------- DeepSeek-VL-1.3B
@pytest.mark.parametrize(
    "name, box",
    [
        ("landscape", [48, 0, 336, 384]),  # 480/640*384 = 288 rows
        ("odd", [64, 0, 320, 384]),  # 427/640*384 = 256.2 -> 256 rows
        ("strip", [185, 0, 199, 384]),  # 8/640*384 = 4.8 -> 4 < 14: the floor keeps 14 rows
    ],
)
def test_1_3b_is_the_original_384_letterbox(deepseek_1b, images, name, box):
    image = images[name]
    assert deepseek_1b.model_type == "deepseek_vl" and deepseek_1b.pad_color == SIGLIP_PAD
    out = deepseek_1b(image, "a white bear.", ["white bear"], return_sam_inputs=False)
    assert out["canvas_sizes"].tolist() == [[384, 384]] and out["content_boxes"].tolist() == [box]
    assert "pixel_values" in out and "high_res_pixel_values" not in out
    pixels = out["pixel_values"]
    top, bottom = box[0], box[2]
    rows = denormalise_to_255(pixels, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)[0, :, : top - 2]
    torch.testing.assert_close(rows, torch.full_like(rows, 127.0), atol=1e-3, rtol=0)
    square, expected_top, _ = original_letterbox(image, 384, SIGLIP_PAD)
    assert expected_top == top and square.size == (384, 384)
    expected = normalise(to_unit_tensor(square), IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)
    assert (pixels - expected).abs().max() < 1e-5
    assert deepseek_1b.reproduction_image_inputs([deepseek_1b.lmm_image(image)[0]]) == {}


def test_deepseek_geometry_floor_and_order():
    # the floor: LLaVA's letterbox has no minimum thickness, DeepSeek-VL's keeps 14 pixels
    assert letterbox_geometry(8, 640, 1024) == ((1024, 1024), (506, 0, 518, 1024))
    assert deepseek_letterbox_geometry(8, 640, 1024) == ((1024, 1024), (505, 0, 519, 1024))
    # the order: int(length / longer * side) (DeepSeek) is not always int(length * side / longer) (LLaVA)
    assert int(17 / 28 * 336) == 203 and int(17 * 336 / 28) == 204
    assert deepseek_letterbox_geometry(17, 28, 336) == ((336, 336), (66, 0, 269, 336))
    assert letterbox_geometry(17, 28, 336) == ((336, 336), (66, 0, 270, 336))
